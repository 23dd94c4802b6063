"""FedRefine: federated refinement of heterogeneous LLMs through KV-cache communication."""

__version__ = "0.1.0"

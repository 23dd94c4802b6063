"""The ``mini`` world: five heterogeneous tiny models that know different things, and the
data to train fusers on and evaluate them, built offline from a seed (DESIGN §5).

>>> from fedrefine_lib.world import build_world
>>> world = build_world(seed=0)            # builds once under data/mini/0/, then loads
>>> world.model_dir(world.receiver)        # AutoModelForCausalLM / AutoTokenizer dir
"""

from .build import World, build_world, load_world, world_dir
from .config import WorldConfig
from .knowledge import DOMAINS, RELATIONS
from .models import RECEIVER, SENDERS, mini_models

__all__ = [
    "DOMAINS",
    "RECEIVER",
    "RELATIONS",
    "SENDERS",
    "World",
    "WorldConfig",
    "build_world",
    "load_world",
    "mini_models",
    "world_dir",
]

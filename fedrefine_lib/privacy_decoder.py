"""Attack (b) of the privacy study: a learned inversion decoder.

An attacker without the patience of a greedy search (``privacy.invert_cache``), or facing a
payload it cannot search (the last position only), trains a small network on public text it
runs through the sender's public weights: one layer's key and value at a position in, token
ids out. Two heads share one hidden layer:

- ``token``: the token at that position (applied to every sent position);
- ``bag``: from the last position, the set of tokens anywhere in the prompt (multi-label:
  attention has mixed every earlier token into the last position's cache).

It is trained on clean float32 caches of public, non-evaluation chats (``study.chat_records``,
rendered as the sender renders a prompt); it meets each transport encoding and noise level as
it is (a non-adaptive attacker).

Shapes: ``N`` positions, ``F = 2 H D`` features (a layer's keys then values, heads
concatenated), ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedrefine_lib.kv import KVCache
from fedrefine_lib.privacy import Strings, Transmitted, recovery, sent_cache


def layer_features(kv: KVCache, layer: int) -> torch.Tensor:
    """One query's ``[1, H, S, D]`` keys and values at ``layer`` as ``[S, F]`` features."""
    k, v = kv.keys[layer][0].float(), kv.values[layer][0].float()  # [H, S, D]
    return torch.cat([k.transpose(0, 1).flatten(1), v.transpose(0, 1).flatten(1)], dim=1)


class InversionDecoder(nn.Module):
    """``[N, F]`` features -> token logits ``[N, V]`` and bag logits ``[N, V]`` (module docstring);
    the features are standardised with the training set's mean and spread."""

    def __init__(self, features: int, vocab: int, layer: int, hidden: int = 256) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.GELU())
        self.token, self.bag = nn.Linear(hidden, vocab), nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body((x - self.mean) / self.std)
        return self.token(h), self.bag(h)

    @torch.no_grad()
    def read(self, sent: Transmitted) -> tuple[list[int], set[int]]:
        """The tokens of the sent positions (argmax) and the bag read from the last one (p > 0.5)."""
        if not sent.kv.present[self.layer]:
            raise ValueError(f"The decoder reads layer {self.layer}, which this payload does not hold; train one for "
                             f"a layer it sends: {[i for i, p in enumerate(sent.kv.present) if p]}.")  # fmt: skip
        tokens, bag = self(layer_features(sent.kv, self.layer))
        return tokens.argmax(-1).tolist(), set(torch.nonzero(bag[-1].sigmoid() > 0.5).flatten().tolist())


def train_decoder(
    model: torch.nn.Module,
    tokenizer,
    chats: Sequence,
    layer: int,
    steps: int = 400,
    batch: int = 256,
    lr: float = 3e-3,
    hidden: int = 256,
    seed: int = 0,
) -> InversionDecoder:
    """Train an :class:`InversionDecoder` on ``chats`` (public, never evaluation items) as the
    sender renders them, reading ``layer``'s cache; ``steps`` Adam steps, each on ``batch``
    positions for the token head and as many chats' last positions for the bag head."""
    if not chats:
        raise ValueError("No chats to train the inversion decoder on: give public, non-evaluation chats.")
    vocab = model.config.get_text_config().vocab_size
    feats, tokens, last, bags = [], [], [], []
    for chat in chats:
        ids, kv = sent_cache(model, tokenizer, chat)
        x = layer_features(kv, layer)  # [S, F]
        feats.append(x)
        tokens.append(torch.tensor(ids))
        last.append(x[-1])
        bag = torch.zeros(vocab)
        bag[torch.tensor(ids)] = 1.0
        bags.append(bag)
    x, y, xl, yb = torch.cat(feats), torch.cat(tokens), torch.stack(last), torch.stack(bags)
    torch.manual_seed(seed)
    decoder = InversionDecoder(x.shape[1], vocab, layer, hidden)
    decoder.mean.copy_(x.mean(0))
    decoder.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x), (batch,), generator=g)
        j = torch.randint(len(xl), (min(batch, len(xl)),), generator=g)
        loss = nn.functional.cross_entropy(decoder(x[i])[0], y[i])
        loss = loss + nn.functional.binary_cross_entropy_with_logits(decoder(xl[j])[1], yb[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return decoder.eval()


def attack_decoder(
    decoder: InversionDecoder, tokenizer, sent: Transmitted, strings: Strings | None = None
) -> list[dict]:
    """Attack (b) on one transmitted query: a row for the token head (the text it reads at the
    sent positions) and one for the bag head, whose ``token_recovery`` is the share of prompt
    positions whose token is in the bag, ``bag_precision`` the share of the bag in the prompt,
    and each ``k_recovery`` counts the strings of set ``k`` whose tokens are all in the bag."""
    tokens, bag = decoder.read(sent)
    in_bag = recovery(sent, tokens, tokenizer, strings, bag=bag)
    in_bag |= {
        "token_recovery": sum(t in bag for t in sent.ids) / len(sent.ids), "exact_query": False,
        "bag_size": len(bag), "bag_precision": len(bag & set(sent.ids)) / len(bag) if bag else 0.0,
    }  # fmt: skip
    return [
        {"attack": "learned decoder: tokens", "layer": decoder.layer, **recovery(sent, tokens, tokenizer, strings)},
        {"attack": "learned decoder: bag", "layer": decoder.layer, **in_bag},
    ]

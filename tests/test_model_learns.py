"""Every kind learns a sequence that needs its mixer: 100 Adam steps take the loss well below
what any model that sees only the current token can reach."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
import torch

from tests.conftest import build_single
from tests.model_configs import KINDS, tiny_model

# Token 5 is followed by 17, 42, 23 and 61 in turn; which one comes next is set by the token
# before the 5. So the next token depends on two tokens, and only a working sequence mixer
# (attention, or Mamba's convolution and scan) gets below the one-token floor.
PERIOD = [5, 17, 5, 42, 5, 23, 5, 61]
SEQ = 32


def _one_token_floor() -> float:
    """The lowest mean loss (nats) of a predictor that sees only the current token: the
    conditional entropy of the next token given the current one, over the period."""
    successors = defaultdict(Counter)
    for i, token in enumerate(PERIOD):
        successors[token][PERIOD[(i + 1) % len(PERIOD)]] += 1
    return -sum(n * math.log(n / sum(c.values())) for c in successors.values() for n in c.values()) / len(
        PERIOD
    )


def _batch(gen: torch.Generator, size: int = 4) -> torch.Tensor:
    """``size`` windows of SEQ + 1 tokens of the repeated period, each from a random phase, so
    that a position says nothing about its token."""
    period = torch.tensor(PERIOD)
    start = torch.randint(0, len(PERIOD), (size, 1), generator=gen)
    return period[(start + torch.arange(SEQ + 1)) % len(PERIOD)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", KINDS)
def test_hundred_steps_go_well_below_the_one_token_floor(single_rank, kind, moe):
    floor = _one_token_floor()
    assert floor == pytest.approx(math.log(4) / 2)  # 4 of 8 positions: one of 4 successors
    model = build_single(tiny_model(kind, moe=moe, num_layers=2), seed=11)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        tokens = _batch(gen)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(SEQ).expand(len(tokens), SEQ)
        opt.zero_grad()
        # The first label has a one-token context only: it is left out of the loss.
        loss = model(ids, pos, None, labels=labels)[:, 1:].mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0, losses[0]  # ~ln(96) at init
    final = sum(losses[-5:]) / 5
    assert final < 0.5 * floor, (kind, moe, floor, losses[::10], losses[-5:])

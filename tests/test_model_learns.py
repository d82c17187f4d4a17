"""Every kind learns: 30 Adam steps on a tiny repeating sequence at least halve the loss."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_single
from tests.model_configs import KINDS, tiny_model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", KINDS)
def test_thirty_steps_halve_the_loss(single_rank, kind, moe):
    model = build_single(tiny_model(kind, moe=moe, num_layers=2), seed=11)
    period = torch.tensor([5, 17, 3, 42, 8, 23, 61, 9])
    tokens = period.repeat(5)[:33].expand(2, 33)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(32).expand(2, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids, pos, None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0, losses[0]  # ~ln(96) at init
    assert losses[-1] < 0.5 * losses[0], (kind, moe, losses[0], losses[-1])

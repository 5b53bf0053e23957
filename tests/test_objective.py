"""The step's shared pieces: the LR schedule (train and finetune), the unit-norm decoder constraint
on both models, and the dead-latent counter with its Adam-moment reset."""

import math

import pytest
import torch

from saecompress.latents import DeadLatents, fired, reset_moments
from saecompress.models import ExpanderSAE, TopKSAE
from saecompress.objective import lr_factor, normalize_decoder, remove_parallel_grad
from saecompress.trainer import TrainConfig


def test_lr_schedule():
    steps = 40
    for step in range(steps):  # finetune's: cosine from 1 to 0, no warm-up
        assert lr_factor(step, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / steps)), rel=1e-12)
    cfg = TrainConfig(warmup_frac=0.1, final_lr_frac=0.2)
    assert [cfg.lr_factor(s, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cfg.lr_factor(10, 100) == pytest.approx(1.0) and cfg.lr_factor(100, 100) == pytest.approx(0.2)
    linear = TrainConfig(warmup_frac=0.1, final_lr_frac=0.2, decay="linear")
    assert linear.lr_factor(55, 100) == pytest.approx(1 - 0.8 * 0.5)
    assert TrainConfig(decay="constant").lr_factor(70, 100) == 1.0


@pytest.mark.parametrize("dense", [False, True])
def test_decoder_rows_stay_unit_and_their_gradient_tangent(dense):
    torch.manual_seed(0)
    sae = TopKSAE(12, 40, 3) if dense else ExpanderSAE(12, 40, 4, 3, encoder="untied")
    rows = sae.W_dec if dense else sae.values
    assert sae.decoder_rows is rows
    with torch.no_grad():
        rows.mul_(torch.rand(40, 1) * 3 + 0.1)
    normalize_decoder(sae)
    torch.testing.assert_close(rows.detach().norm(dim=1), torch.ones(40))
    sae(torch.randn(16, 12)).pow(2).sum().backward()
    before = rows.grad.clone()
    remove_parallel_grad(sae)
    assert float((rows.grad * rows.detach()).sum(1).abs().max()) < 1e-5 * float(before.abs().max())
    assert float((rows.grad - before).norm()) > 0


def test_dead_latents_and_moment_reset():
    values = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    indices = torch.tensor([[0, 1], [2, 3]])
    assert fired(values, indices, 5).tolist() == [True, False, False, True, False]
    dead = DeadLatents(5, dead_tokens=4)
    dead.update(fired(values, indices, 5), 3)
    assert dead.indices().tolist() == [] and dead.fraction() == 0
    dead.update(torch.tensor([True, False, False, False, False]), 2)
    assert dead.indices().tolist() == [1, 2, 4] and dead.fraction() == pytest.approx(0.6)  # 3 had fired 2 ago
    dead.revived(torch.tensor([1, 2]))
    assert dead.mask().tolist() == [False, False, False, False, True]

    w = torch.nn.Parameter(torch.randn(3, 5))
    optimizer = torch.optim.Adam([w], lr=0.1)
    w.pow(2).sum().backward()
    optimizer.step()
    reset_moments(optimizer, w, torch.tensor([1, 4]), axis=1)
    for key in ("exp_avg", "exp_avg_sq"):
        moment = optimizer.state[w][key]
        assert torch.count_nonzero(moment[:, [1, 4]]) == 0 and torch.count_nonzero(moment[:, [0, 2, 3]]) == 9

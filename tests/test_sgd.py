"""The loop's SGD gives torch.optim.SGD's numbers, and a cold run's imports stay lean (core/sgd.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from core.sgd import SGD


def two_layers(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])  # single-tensor and foreach paths
@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.9, 5e-4, False), (0.9, 5e-4, True), (0.0, 0.0, False)])
def test_steps_match_torch_optim_sgd_to_the_last_digit(momentum, weight_decay, nesterov, device):
    ours, theirs = two_layers(0).to(device), two_layers(0).to(device)
    opt = SGD([(ours[0].parameters(), 0.05), (ours[2].parameters(), 0.01)], momentum=momentum,
              weight_decay=weight_decay, nesterov=nesterov)
    ref = torch.optim.SGD([{"params": theirs[0].parameters(), "lr": 0.05},
                           {"params": theirs[2].parameters(), "lr": 0.01}], lr=0.05, momentum=momentum,
                          weight_decay=weight_decay, nesterov=nesterov)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(8, 6, generator=gen).to(device), torch.randint(0, 3, (8,), generator=gen).to(device)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            if step in (2, 3):  # the last layer gets no gradient: skipped (no decay), its buffers kept
                loss = model[0](x).pow(2).mean()
            else:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight.cpu(), two_layers(0)[0].weight)  # the steps moved something


def test_no_parameters_and_nesterov_without_momentum_are_refused():
    with pytest.raises(ValueError, match="no parameters"):
        SGD([([], 0.1)])
    with pytest.raises(ValueError, match="needs momentum"):
        SGD([(two_layers(0).parameters(), 0.1)], nesterov=True)


def test_a_cli_run_imports_neither_the_compiler_nor_scikit_learn_until_it_needs_them():
    """torch.optim's Optimizer imports torch._dynamo (about 1 s) and the audit module imported scikit-learn
    (about 1 s) at every cold start; a CLI run needs neither, not even the membership attack of a run with a
    retrain reference (its ROC is core.audit.mia.roc)."""
    code = ("import sys, torch, numpy as np\n"
            "import core.cli, core.pipeline, core.audit\n"
            "from core.audit.mia import confidence_mia\n"
            "from core.sgd import SGD\n"
            "m = torch.nn.Linear(3, 2); opt = SGD([(m.parameters(), 0.1)], momentum=0.9)\n"
            "m(torch.ones(1, 3)).sum().backward(); opt.step()\n"
            "confidence_mia(np.array([0.9, 0.8]), np.array([0.1, 0.2]), np.array([0.5]))\n"
            "print(sorted(n for n in ('torch._dynamo', 'sklearn') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_config_refuses_nesterov_without_momentum():
    from core.methods import UnlearnConfig

    with pytest.raises(ValueError, match="nesterov needs momentum"):
        UnlearnConfig(method="adv", momentum=0.0, nesterov=True).validate()
    UnlearnConfig(method="adv", momentum=0.9, nesterov=True).validate()


def test_lr_scale_multiplies_every_groups_learning_rate():
    """The schedule sets lr_scale before a step: the same as torch.optim.SGD at the scaled rates."""
    ours, theirs = two_layers(0), two_layers(0)
    opt = SGD([(ours[0].parameters(), 0.05), (ours[2].parameters(), 0.01)], momentum=0.9)
    ref = torch.optim.SGD([{"params": theirs[0].parameters(), "lr": 0.05 * 0.25},
                           {"params": theirs[2].parameters(), "lr": 0.01 * 0.25}], lr=0.05, momentum=0.9)
    opt.lr_scale = 0.25
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_the_schedule_warms_up_then_decays_once_per_pass():
    from core.engine import lr_scale
    from core.methods import UnlearnConfig

    constant = UnlearnConfig(method="adv")
    assert {lr_scale(constant, s, 5) for s in range(50)} == {1.0}
    warm = UnlearnConfig(method="adv", warmup_steps=4)
    assert [lr_scale(warm, s, 5) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    decay = UnlearnConfig(method="adv", lr_decay=0.5)
    assert [lr_scale(decay, s, 2) for s in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    both = UnlearnConfig(method="adv", warmup_steps=2, lr_decay=0.5)
    assert [lr_scale(both, s, 2) for s in range(4)] == [0.5, 1.0, 0.5, 0.5]
    for bad in (dict(lr_decay=0.0), dict(lr_decay=1.5), dict(warmup_steps=-1)):
        with pytest.raises(ValueError):
            UnlearnConfig(method="adv", **bad).validate()

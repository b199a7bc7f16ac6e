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
    (about 1 s) at every cold start; a run without a retrain reference needs neither."""
    code = ("import sys, torch\n"
            "import core.cli, core.pipeline, core.audit\n"
            "from core.sgd import SGD\n"
            "m = torch.nn.Linear(3, 2); opt = SGD([(m.parameters(), 0.1)], momentum=0.9)\n"
            "m(torch.ones(1, 3)).sum().backward(); opt.step()\n"
            "print(sorted(n for n in ('torch._dynamo', 'sklearn') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_config_refuses_nesterov_without_momentum():
    from core.methods import UnlearnConfig

    with pytest.raises(ValueError, match="nesterov needs momentum"):
        UnlearnConfig(method="adv", momentum=0.0, nesterov=True).validate()
    UnlearnConfig(method="adv", momentum=0.9, nesterov=True).validate()

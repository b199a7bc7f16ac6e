"""SGD with momentum for the unlearning loop: torch's own update, without torch.optim's Optimizer class.

The Optimizer constructor imports the compiler (torch._dynamo) to mark its step function: about 1 s of
every cold CLI run, which never compiles anything (bench/results/speed-k32-intel-v13-*.md). The update
itself is torch's functional SGD (`torch.optim.sgd.sgd`), so a step gives the same numbers to the last
digit, on the CPU's single-tensor path and CUDA's foreach path alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


class SGD:
    """SGD (momentum, optionally Nesterov's; weight decay; no dampening) over groups of (parameters, lr).

    Like torch.optim.SGD, a parameter without a gradient at a step is skipped (no decay, buffer kept)."""

    def __init__(self, groups: Iterable[tuple[Iterable[torch.nn.Parameter], float]], *, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        self.groups = [(list(params), float(lr)) for params, lr in groups]
        if not any(params for params, _ in self.groups):
            raise ValueError("SGD got no parameters to update")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)
        self.buffers: dict[torch.nn.Parameter, torch.Tensor | None] = {}
        self.lr_scale = 1.0  # every group's lr is multiplied by it (a schedule sets it before a step)

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for params, lr in self.groups:
            live = [p for p in params if p.grad is not None]
            if not live:
                continue
            bufs = [self.buffers.get(p) for p in live]
            sgd(live, [p.grad for p in live], bufs, weight_decay=self.weight_decay, momentum=self.momentum,
                lr=lr * self.lr_scale, dampening=0.0, nesterov=self.nesterov, maximize=False)
            self.buffers.update(zip(live, bufs, strict=True))  # sgd() fills in each new buffer in the list

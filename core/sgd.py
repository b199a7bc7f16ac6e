"""SGD with momentum (and Adam) for the unlearning loop: torch's own updates, without torch.optim's Optimizer class.

The Optimizer constructor imports the compiler (torch._dynamo) to mark its step function: about 1 s of
every cold CLI run, which never compiles anything (bench/results/speed-k32-intel-v13-*.md). The update
itself is torch's functional SGD (`torch.optim.sgd.sgd`), so a step gives the same numbers to the last
digit, on the CPU's single-tensor path and CUDA's foreach path alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adam import adam
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


class Adam:
    """Adam (torch's functional update; L2 weight decay as torch.optim.Adam) over groups of (parameters, lr).

    The same interface as SGD: `lr_scale` multiplies every group's lr; a parameter without a gradient is skipped."""

    def __init__(self, groups: Iterable[tuple[Iterable[torch.nn.Parameter], float]], *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.groups = [(list(params), float(lr)) for params, lr in groups]
        if not any(params for params, _ in self.groups):
            raise ValueError("Adam got no parameters to update")
        self.betas, self.eps, self.weight_decay = betas, float(eps), float(weight_decay)
        self.state: dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.lr_scale = 1.0

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
            for p in live:
                if p not in self.state:
                    self.state[p] = (torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0))
            m, v, t = zip(*(self.state[p] for p in live), strict=True)
            adam(live, [p.grad for p in live], list(m), list(v), [], list(t), amsgrad=False,
                 beta1=self.betas[0], beta2=self.betas[1], lr=lr * self.lr_scale, weight_decay=self.weight_decay,
                 eps=self.eps, maximize=False)

"""The proxy set: targeted L2-PGD variants of the forget images.

The retain set is not available, so each forget image is pushed, n times, toward a
random wrong class of the ORIGINAL model; the variants labelled with their targets
stand in for "knowledge to keep" (DESIGN.md section 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Cancelled(RuntimeError):
    """The user cancelled the run; raised at the next cancel check (within about a second in every phase)."""


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform over the other C-1 classes: (y + U{1..C-1}) mod C never equals y."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def _l2_project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


# On the CPU each gradient pass takes at most this many images (about a second on 2 cores), so a cancel
# answers between passes; a row's gradient does not depend on the pass it is in (eval mode).
CPU_GRAD_BATCH = 128


def targeted_l2_pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, step: float, iters: int,
                    generator: torch.Generator, early_exit: bool = False,
                    should_cancel: Callable[[], bool] | None = None,
                    grad_batch: int | None = None) -> torch.Tensor:
    """Random start in the L2 ball, normalised-gradient descent on CE(target), clipped to [0, 1].

    early_exit: a sample stops moving once the model predicts its target (it is a proxy of that
    class already); the remaining iterations only run on the samples still on their way.
    Gradients are computed `grad_batch` rows at a time (default: CPU_GRAD_BATCH on the CPU, all rows
    elsewhere); should_cancel is checked before each of these passes.
    """
    shape = (-1, *([1] * (x.dim() - 1)))
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    radius = torch.rand(len(x), generator=generator).to(x.device).view(shape)
    delta = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(radius) * radius * eps
    x_adv = (x + delta).clamp(0, 1)
    active = torch.arange(len(x), device=x.device)
    sub = max(1, grad_batch or (CPU_GRAD_BATCH if x.device.type == "cpu" else len(x)))
    for _ in range(iters):
        xs, grads, preds = [], [], []
        for i in range(0, len(active), sub):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled while generating the proxy set")
            rows = active[i:i + sub]
            xa = x_adv[rows].detach().requires_grad_(True)
            logits = model(xa)
            loss = F.cross_entropy(logits, target[rows], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            xs.append(xa.detach())
            grads.append(grad)
            preds.append(logits.argmax(1))
        xa, grad = torch.cat(xs), torch.cat(grads)
        if early_exit:
            moving = torch.cat(preds) != target[active]
            active, xa, grad = active[moving], xa[moving], grad[moving]
            if len(active) == 0:
                break
        gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        stepped = xa - step * grad / gnorm
        x0 = x[active]
        x_adv[active] = (x0 + _l2_project(stepped - x0, eps)).clamp(0, 1)
    return x_adv.detach()


def make_proxy_set(model: nn.Module, x_forget: torch.Tensor, y_forget: torch.Tensor, num_classes: int, n_adv: int,
                   eps: float, step: float, iters: int, seed: int, chunk: int = 1024,
                   on_chunk: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   early_exit: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n_adv targeted variants per forget image, all batched together.

    Returns (x_adv, y_adv, source) where source[i] is the forget row x_adv[i] came from.
    The model is used in eval mode and left as it was found.
    """
    if num_classes < 2:
        raise ValueError("targeted attacks need at least two classes")
    gen = torch.Generator().manual_seed(seed)
    device = x_forget.device
    source = torch.arange(len(x_forget)).repeat_interleave(n_adv)
    targets = random_targets(y_forget.cpu()[source], num_classes, gen)
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    try:
        for start in range(0, len(source), chunk):
            if should_cancel and should_cancel():
                raise Cancelled("cancelled while generating the proxy set")
            rows = source[start:start + chunk]
            x = x_forget[rows.to(device)]
            out.append(targeted_l2_pgd(model, x, targets[start:start + chunk].to(device), eps, step, iters, gen,
                                       early_exit, should_cancel))
            if on_chunk:
                on_chunk(min(start + chunk, len(source)), len(source))
    finally:
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    x_adv = torch.cat(out) if out else x_forget[:0]
    return x_adv.contiguous(memory_format=torch.channels_last), targets.to(device), source

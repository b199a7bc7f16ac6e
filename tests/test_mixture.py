"""The retention term on mixtures of forget images (config mix_weight), by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from core.methods import MIX_POOL, Context, UnlearnConfig, mixture_batch, mixture_kl, mixture_pool


def _ctx(step: int = 3) -> Context:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    live = copy.deepcopy(original)
    cfg = UnlearnConfig(method="adv", seed=5, batch_size=6, mix_weight=2.0, mix_batch=6)
    ctx = Context(model=live, original=original, config=cfg, step=step)
    ctx.state["x_forget"] = torch.rand(4, 1, 4, 4)
    ctx.state["mix_pool"] = mixture_pool(ctx.state["x_forget"], cfg)
    return ctx


def test_mixture_pool_by_hand() -> None:
    """MIX_POOL x mix_batch blends of two forget images, lam in [0.3, 0.7], fixed by the seed."""
    ctx = _ctx()
    pool, x_f = ctx.state["mix_pool"], ctx.state["x_forget"]
    g = torch.Generator().manual_seed(5 * 100_003)
    n = MIX_POOL * 6
    i, j = torch.randint(4, (n,), generator=g), torch.randint(4, (n,), generator=g)
    lam = (0.3 + 0.4 * torch.rand(n, generator=g)).view(-1, 1, 1, 1)
    torch.testing.assert_close(pool, lam * x_f[i] + (1 - lam) * x_f[j])
    assert 0.3 <= float(lam.min()) and float(lam.max()) <= 0.7
    torch.testing.assert_close(mixture_pool(x_f, ctx.config), pool)  # reproducible


@pytest.mark.parametrize("labels, rule", [
    ([0, 0, 1, 2, 2, 1], "cross"),     # two images of different classes
    ([3, 3, 3, 3, 3, 3], "cross"),     # one class only: two different images
    ([0, 0, 1, 2, 2, 1], "distinct"),  # never an image with itself
])
def test_mixture_pool_pairs(labels: list[int], rule: str) -> None:
    """Each forget image lights its own pixel, so a mixture's non-zero pixels name the two images it joins."""
    x_f, y_f = torch.eye(6).view(6, 1, 2, 3), torch.tensor(labels)
    cfg = UnlearnConfig(method="structguard", seed=2, mix_batch=16, mix_pairs=rule)
    pool = mixture_pool(x_f, cfg, y_f).flatten(1)
    assert pool.shape == (MIX_POOL * 16, 6)
    pairs = [tuple(torch.nonzero(row).flatten().tolist()) for row in pool]
    assert all(len(p) == 2 for p in pairs)  # two different images every time (one pixel would be an image with itself)
    if rule == "cross" and len(set(labels)) > 1:
        assert all(labels[a] != labels[b] for a, b in pairs)
    assert len(set(pairs)) > 10  # partners vary
    torch.testing.assert_close(mixture_pool(x_f, cfg, y_f).flatten(1), pool)  # reproducible
    lam = pool.max(1).values
    assert float(lam.min()) >= 0.5 - 1e-6 and float(lam.max()) <= 0.7 + 1e-6


def test_the_default_pool_can_mix_an_image_with_itself() -> None:
    """mix_pairs="any" (the default until measured otherwise) draws both images independently."""
    x_f = torch.eye(6).view(6, 1, 2, 3)
    pool = mixture_pool(x_f, UnlearnConfig(method="structguard", seed=2, mix_batch=16), torch.zeros(6))
    assert any(int((row > 0).sum()) == 1 for row in pool.flatten(1))


def mixture_distillation(ctx: Context) -> torch.Tensor:
    x, target = mixture_batch(ctx)
    return mixture_kl(ctx.model(x), target)


def test_mixture_distillation_by_hand() -> None:
    ctx = _ctx()
    assert abs(float(mixture_distillation(ctx).detach())) < 1e-6  # the live model is still the original
    with torch.no_grad():
        ctx.model[1].weight.add_(0.3 * torch.randn_like(ctx.model[1].weight))
    # the same batch by hand: (seed, step) fix the rows of the pool
    g = torch.Generator().manual_seed(5 * 100_003 + 3)
    x = ctx.state["mix_pool"][torch.randint(MIX_POOL * 6, (6,), generator=g)]
    p = torch.softmax(ctx.original(x), 1)
    q = torch.log_softmax(ctx.model(x), 1)
    by_hand = (p * (p.log() - q)).sum(1).mean()
    torch.testing.assert_close(mixture_distillation(ctx), by_hand)
    assert float(by_hand.detach()) > 0


def test_mixture_batches_change_with_the_step() -> None:
    a, b = _ctx(step=3), _ctx(step=4)
    for c in (a, b):
        with torch.no_grad():
            c.model[1].weight.add_(0.3)
    assert not torch.isclose(mixture_distillation(a), mixture_distillation(b))


def test_the_proxy_methods_at_k32_mix_distinct_images_by_default() -> None:
    """The held-out choice of docs/METHOD.md v15; the other forget sizes keep independent draws."""
    from core.methods import default_config

    for method in ("adv", "l2ul", "structguard"):
        cfg = default_config(method, k=32)
        assert (cfg.mix_pairs, cfg.mix_weight) == ("distinct", 4.0)
        assert default_config(method, k=8).mix_pairs == default_config(method, k=128).mix_pairs == "any"
    assert default_config("structguard", k=32, schedule="paper").mix_weight == 0.0

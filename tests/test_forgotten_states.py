"""bench/forgotten_states.py on a real (small) engine run: its first forgotten state is where the default run stops,
and every state it keeps is forgotten, within the window, and scored."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import spearmanr

from bench.forgotten_states import forgotten_states, spearman, summary_row
from bench.tune import context
from core.engine import run_unlearning
from core.methods import default_config
from core.train import to_device_format

SMALL = {"n_adv": 3, "pgd_iters": 3, "max_epochs": 40, "precision": "fp32"}


def test_spearman_is_scipys_with_ties():
    rng = random.Random(3)
    for _ in range(20):
        a = [rng.choice([1.0, 2.0, 2.5, 3.0]) for _ in range(9)]
        b = [rng.random() for _ in range(9)]
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).correlation)
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None and spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_the_first_forgotten_state_is_the_default_runs_stop():
    k, seed, window = 8, 0, 6
    res = forgotten_states("adv", k, seed, (seed,), window, retain=300, encoder="minilm", overrides=SMALL)
    ctx = context((k,), (seed,), 300, "minilm")
    pos = ctx.ds.train.positions(ctx.forget[(k, seed)])
    x_f, y_f = to_device_format(ctx.ds.train.images(pos), torch.device("cpu")), ctx.ds.train.labels[pos]
    plain = run_unlearning(ctx.model, x_f, y_f, ctx.ds.num_classes,
                           default_config("adv", ctx.ds.name, k=k, **SMALL, seed=seed), ctx.anchors)
    assert plain.stop_reason == "forgotten"
    states = res["states"]
    assert states and states[0]["step"] == plain.steps  # the same trajectory: the default stops there
    assert all(s["step"] <= plain.steps + window for s in states)
    assert [s["step"] for s in states] == sorted({s["step"] for s in states})
    assert all(0 <= s["A_r"] <= 100 and s["mix_kl"] >= 0 and s["proxy_ce"] >= 0 for s in states)
    row = summary_row(res).split(" | ")
    assert row[2:5] == [str(plain.steps), f"{states[0]['A_r']:.2f}", str(len(states))]

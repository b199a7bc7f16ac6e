"""bench/forgotten_states.py on a real (small) engine run: its first forgotten state is where the default run stops,
and every state it keeps is forgotten, within the window, and scored."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import spearmanr

from bench.forgotten_states import forgotten_states, picks, picks_table, spearman, summary_row
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


def test_the_stop_rules_pick_within_the_window():
    states = [{"step": 10, "A_r": 70.0, "mix_kl": 0.30}, {"step": 40, "A_r": 75.0, "mix_kl": 0.10},
              {"step": 90, "A_r": 72.0, "mix_kl": 0.20}, {"step": 300, "A_r": 80.0, "mix_kl": 0.05}]
    res = {"states": states}
    assert picks(res, 0) == {"stop": 70.0, "last": 70.0, "min_kl": 70.0}
    assert picks(res, 80) == {"stop": 70.0, "last": 72.0, "min_kl": 75.0}  # step 90 is 80 steps past the stop
    assert picks(res, 290) == {"stop": 70.0, "last": 80.0, "min_kl": 80.0}
    assert picks({"states": []}, 100) is None
    other = {"states": [{"step": 5, "A_r": 60.0, "mix_kl": 0.1}, {"step": 20, "A_r": 58.0, "mix_kl": 0.2}]}
    row = picks_table([res, other, {"states": []}], [80])[-1]
    # stop: (70 + 60) / 2; last: (72 + 58) / 2, gains +2 and -2; lowest KL: (75 + 60) / 2, gains +5 and 0
    assert row == "| 80 | 2 | 65.00 | 65.00 (+0.00, 1 of 2) | 67.50 (+2.50, 1 of 2) |"

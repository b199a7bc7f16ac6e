"""The bench table: mean ± std, the 95% t-interval, the retrain reference rows, the forgot count,
and `bench --from-jsonl` rendering one table from rows saved by several processes.

The rows are written the way `python -m core bench --jsonl` writes them (one real engine run is
covered by tests/test_engine.py and tests/test_retrain.py; here only the arithmetic and layout).
"""

from __future__ import annotations

import json

import pytest

from core.cli_bench import VARIANTS, _fmt, _variant, bench_table, t95
from core.engine import UnlearnError


def _row(label: str, k: int, seed: int, test: float, forget: float = 0.0, ref: bool = True) -> dict:
    timings = {"proxy": 1.0, "importance": 0.5, "updates": 10.0 + seed, "evaluation": 3.0, "evaluation_before": 1.0,
               "total": 16.0 + seed}
    return {"label": label, "method": label.split(":")[0], "k": k, "seed": seed, "forget_acc": forget,
            "retain_acc": test + 1, "test_acc": test, "structure_score": 0.9, "steps": 40 + seed,
            "seconds": 16.0 + seed, "timings": timings, "peak_rss_mb": 900.0 + seed,
            "before": {"forget_acc": 100.0, "retain_acc": 95.0, "test_acc": 93.4},
            "retrain": {"forget_acc": 93.75, "retain_acc": 95.0, "test_acc": 93.5} if ref else None,
            "tug_of_war": 0.05 if ref else None, "gap_test": test - 93.5 if ref else None,
            "mia": {"retrain": 0.6, "unlearned": 0.1} if ref else None,
            "mia_auc": {"retrain": 0.5, "unlearned": 0.08 + seed / 100} if ref else None}


def test_fmt_mean_std_and_interval():
    assert _fmt([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    # t(0.975, 2) = 4.303: half-width 4.303 * 1 / sqrt(3) = 2.484
    assert _fmt([1.0, 2.0, 3.0], ci=True) == "2.00 ± 1.00 [-0.48, 4.48]"
    assert _fmt([5.0]) == "5.00" and _fmt([]) == "n/a" and _fmt([None, float("nan")]) == "n/a"


def test_t95_is_students_quantile_beyond_the_table():
    # scipy.stats.t.ppf(0.975, n - 1): the intervals over 12 and 16 held-out sets must not fall back to 1.96
    exact = {3: 4.3027, 10: 2.2622, 11: 2.2281, 12: 2.2010, 16: 2.1314, 31: 2.0423, 1000: 1.9623}
    for n, t in exact.items():
        assert t95(n) == pytest.approx(t, abs=0.003), n
    with pytest.raises(ValueError, match="at least 2"):
        t95(1)


def test_variants_parse_and_refuse_unknown():
    assert _variant("structguard:paper") == ("structguard", {"schedule": "paper"})
    assert _variant("structguard:no-sr") == ("structguard", {"sr": False})
    assert set(VARIANTS) == {"", "paper", "no-sa", "no-sr", "no-cr", "no-mix", "polish"}
    assert _variant("adv:no-mix") == ("adv", {"mix_weight": 0.0})
    assert _variant("structguard:polish") == ("structguard", {"polish_steps": 100})
    with pytest.raises(UnlearnError, match="unknown bench entry"):
        _variant("structguard:fast")


def test_table_rows_references_and_forgot_count():
    rows = [_row("adv", 32, s, 70.0 + s) for s in range(3)]
    rows += [_row("structguard", 32, s, 80.0 + s, forget=3.125 if s == 2 else 0.0, ref=s == 0) for s in range(3)]
    for r in rows[3:]:
        r["precision"] = "bf16"
    lines = bench_table(rows, ["adv", "structguard"], [32])
    assert lines[0].startswith("| k | method | A_f | A_r | A_test [95% CI]")
    original, retrain, adv, sg = lines[2:]
    assert original.startswith("| 32 | original | 100.00 | 95.00 | 93.40 |")
    assert retrain.startswith("| 32 | retrain (3 of 3 seeds) | 93.75 ± 0.00 | 95.00 ± 0.00 | 93.50 ± 0.00 | 0 | 1 |")
    assert adv.startswith("| 32 | adv | 0.00 ± 0.00 | 72.00 ± 1.00 | 71.00 ± 1.00 [68.52, 73.48] |")
    assert "| 3/3 |" in adv and "| 902 |" in adv
    assert "| 41 ± 1 |" in adv  # rows that do not record their precision (before December 2026) say nothing
    assert "| 2/3 |" in sg  # seed 2 left one image recognised: the table says so
    assert "| 41 ± 1 (bf16) |" in sg  # the update steps' number format, which explains much of the seconds
    assert "| 0.050 |" in sg  # Tug-of-War only from the seed that has a retrained reference
    assert "| 0.60 ± 0.00; 0.50 ± 0.00 |" in retrain and "| 0.10 ± 0.00; 0.09 ± 0.01 |" in adv
    del rows[0]["mia_auc"], rows[1]["mia_auc"], rows[2]["mia_auc"]  # rows made before the forget AUC
    lines = bench_table(rows, ["adv", "structguard"], [32])
    assert "| 0.10 ± 0.00; n/a |" in lines[4]
    assert "| 0.60 ± 0.00; n/a |" in lines[3]


def test_cli_bench_from_jsonl(run_cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [_row("neggrad", 8, s, 20.0 + s) for s in range(2)] + [_row("l2ul", 8, s, 85.0) for s in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "table.md"
    proc = run_cli("bench", "--from-jsonl", str(path), "--ks", "8", "--seeds", "0,1", "--methods", "l2ul,neggrad",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.index("| 8 | l2ul |") < text.index("| 8 | neggrad |")  # the order asked for, not the file's
    assert "| 8 | neggrad | 0.00 ± 0.00 | 21.50 ± 0.71 | 20.50 ± 0.71" in text
    assert "runs took 66 s in all" in text

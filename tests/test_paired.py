"""bench/paired.py: the paired comparison of two held-out settings that the closing notes quote; and bench/tune.py's
table of the settings it compares."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.paired import paired, parse_filter, pick

ROOT = Path(__file__).resolve().parents[1]


def row(method: str, a_r: dict[int, float], **setting) -> dict:
    return {"method": method, "k": 32, **setting,
            "by_seed": {str(s): {"A_f": 0.0, "A_r": v, "steps": 100} for s, v in a_r.items()}}


def test_paired_difference_and_interval_by_hand():
    a = row("adv", {100: 90.0, 101: 88.0, 102: 86.0})
    b = row("structguard", {100: 91.0, 101: 88.5, 102: 86.0, 103: 80.0})  # 103 has no partner: left out
    res = paired(a, b)
    assert res["seeds"] == ["100", "101", "102"]
    assert res["diffs"] == [1.0, 0.5, 0.0]
    assert res["mean"] == pytest.approx(0.5)
    # sd 0.5, t(2 dof) 4.303: half-width 4.303 * 0.5 / sqrt(3)
    assert res["high"] - res["mean"] == pytest.approx(4.303 * 0.5 / 3 ** 0.5)
    assert res["b_better"] == 2


def test_pick_takes_the_last_matching_row_with_per_seed_results():
    old = row("adv", {100: 1.0, 101: 2.0}, mix_weight=3.0)
    new = row("adv", {100: 5.0, 101: 6.0}, mix_weight=3.0)
    no_seeds = {"method": "adv", "k": 32, "mix_weight": 3.0}
    assert pick([old, new, no_seeds], parse_filter("method=adv,mix_weight=3.0"), "a") is new
    with pytest.raises(ValueError, match="no row"):
        pick([old], parse_filter("method=adv,mix_weight=5.0"), "a")
    with pytest.raises(ValueError, match="key=value"):
        parse_filter("method")


def test_command_line_reports_and_refuses_clearly(tmp_path):
    f = tmp_path / "tune.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [row("adv", {100: 90.0, 101: 88.0}),
                                                      row("structguard", {100: 89.0, 101: 88.0})]))
    cmd = [sys.executable, "bench/paired.py", str(f), "--a", "method=adv"]
    out = subprocess.run([*cmd, "--b", "method=structguard"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "-0.50 points" in out.stdout and "B kept more on 0 of 2" in out.stdout
    assert "A: method=adv, k=32" in out.stdout
    bad = subprocess.run([*cmd, "--b", "method=l2ul"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no row with per-seed results" in bad.stderr


def test_file_filter_pairs_the_same_setting_across_two_files(tmp_path):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    before.write_text(json.dumps(row("adv", {100: 90.0, 101: 88.0})))
    after.write_text(json.dumps(row("adv", {100: 91.0, 101: 89.0})))
    out = subprocess.run([sys.executable, "bench/paired.py", str(before), str(after),
                          "--a", f"method=adv,file={before}", "--b", f"method=adv,file={after}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "+1.00 points" in out.stdout and f"file={after}" in out.stdout


def test_repeated_filters_join_rows_of_other_forget_sets(tmp_path):
    f = tmp_path / "tune.jsonl"
    rows = [row("adv", {100: 90.0, 101: 88.0}, part=1), row("adv", {102: 80.0, 103: 82.0}, part=2),
            row("structguard", {100: 91.0, 101: 88.0, 102: 81.0, 103: 82.0})]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cmd = [sys.executable, "bench/paired.py", str(f), "--b", "method=structguard", "--a", "method=adv,part=1"]
    out = subprocess.run([*cmd, "--a", "method=adv,part=2"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "over 4 forget sets (seeds 100, 101, 102, 103): +0.50 points" in out.stdout
    assert "B kept more on 2 of 4" in out.stdout and "(sets 102, 103)" in out.stdout
    twice = subprocess.run([*cmd, "--a", "method=adv,part=1"], cwd=ROOT, capture_output=True, text=True)
    assert twice.returncode == 2 and "100, 101 appear in two of the rows picked" in twice.stderr


def test_tune_table_has_one_column_per_grid_field_even_with_none():
    from bench.tune import result_table

    def row(k: int, a_r: float, a_f_max: float = 0.0, **setting) -> dict:
        return {"k": k, **setting, "A_f": a_f_max / 4, "A_f_max": a_f_max, "A_r": a_r, "A_r_min": a_r - 1,
                "steps": 100.0, "seconds": 9.5}

    lines = result_table([row(128, 75.3)], [], [128])  # the defaults alone: no grid columns
    assert lines[:3] == ["| k | A_f (max) | A_r (min) | steps | seconds | chosen |", "|---" * 6 + "|",
                         "| 128 | 0.00 (0.0) | 75.30 (74.30) | 100 | 9.5 | **yes** |"]
    rows = [row(32, 90.0, lr=0.1), row(32, 91.0, a_f_max=3.1, lr=0.2), {"k": 32, "lr": 0.3, "error": "boom"}]
    lines = result_table(rows, ["lr"], [32])
    assert [line.count("|") for line in lines] == [8] * 5  # every row as wide as the header
    assert lines[2].endswith("| **yes** |") and lines[3].endswith("|  |")  # A_f above 0 is never chosen
    assert "failed: boom" in lines[4]

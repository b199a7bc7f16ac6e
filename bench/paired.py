"""Compare two held-out tuning settings forget set by forget set (paired), from bench/tune.py's JSON rows.

    python bench/paired.py bench/results/v9/tune.jsonl --a method=adv,k=32,mix_weight=3.0 \
        --b method=structguard,k=32,lr=0.001,mix_weight=3.0

Prints, over the forget sets both settings ran on, the mean of B - A on A_r with its 95% t-interval, how many sets
B kept more on, and the A_f of each. Runs differ by about a point from float rounding alone (docs/METHOD.md,
engine v5), so a difference whose interval holds 0 is not a finding. With several files, `file=PATH` in a filter
picks the file a row comes from (the same setting before and after an engine change). `--a` or `--b` given more
than once joins the rows they pick into one setting, for a setting whose forget sets ran in separate rows (for
example seeds 100-103 and 104-107); a forget set in two of them is refused. Rows without `by_seed` (written before
bench/tune.py kept it) cannot be paired.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.cli_bench import t95  # noqa: E402


def parse_filter(text: str) -> dict[str, str]:
    """'method=adv,k=32' -> {'method': 'adv', 'k': '32'}; values compare as text against the row's JSON values."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"filter {text!r}: write key=value pairs separated by commas, e.g. method=adv,k=32")
    return dict(pairs)


def matches(row: dict, want: dict[str, str]) -> bool:
    return all(key in row and (str(row[key]) == value or json.dumps(row[key]) == value) for key, value in want.items())


def pick(rows: list[dict], want: dict[str, str], name: str) -> dict:
    """The last row that matches (a setting re-run later replaces the earlier one) and has per-seed results."""
    found = [r for r in rows if matches(r, want) and "by_seed" in r]
    if not found:
        raise ValueError(f"--{name}: no row with per-seed results matches {want}")
    return found[-1]


def join(rows: list[dict], name: str) -> dict:
    """One setting from the rows picked for it: their per-seed results side by side (each forget set once)."""
    by_seed: dict[str, dict] = {}
    for r in rows:
        twice = sorted(set(by_seed) & set(r["by_seed"]), key=int)
        if twice:
            raise ValueError(f"--{name}: forget set(s) {', '.join(twice)} appear in two of the rows picked; "
                             "narrow the filters (file=..., a setting's key) so that each set comes from one row")
        by_seed.update(r["by_seed"])
    return {**rows[-1], "by_seed": by_seed}


def paired(a: dict, b: dict) -> dict:
    """B - A on A_r over the forget sets both have: mean, 95% t-interval, and the per-set numbers."""
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]), key=int)
    if len(seeds) < 2:
        raise ValueError(f"the two settings share {len(seeds)} forget set(s); pairing needs at least 2")
    diffs = [b["by_seed"][s]["A_r"] - a["by_seed"][s]["A_r"] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t95(len(diffs)) * sd / len(diffs) ** 0.5
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "low": mean - half, "high": mean + half,
            "b_better": sum(d > 0 for d in diffs),
            "A_f": {"a": [a["by_seed"][s]["A_f"] for s in seeds], "b": [b["by_seed"][s]["A_f"] for s in seeds]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("jsonl", nargs="+", help="bench/tune.py --jsonl files")
    p.add_argument("--a", required=True, action="append",
                   help="key=value,... picking the reference setting (repeat to join rows of other forget sets)")
    p.add_argument("--b", required=True, action="append",
                   help="key=value,... picking the setting compared with it (repeatable, as --a)")
    args = p.parse_args()
    # `file` (the path as given) lets a filter pick between files, e.g. the same setting before and after a change
    rows = [{**json.loads(line), "file": f} for f in args.jsonl for line in Path(f).read_text().splitlines()
            if line.strip()]
    try:
        picked = {name: [pick(rows, parse_filter(f), name) for f in getattr(args, name)] for name in ("a", "b")}
        res = paired(join(picked["a"], "a"), join(picked["b"], "b"))
    except ValueError as exc:
        p.error(str(exc))
    stats = {"A_f", "A_f_max", "A_r", "A_r_min", "steps", "seconds", "base_r", "by_seed", "error"}
    for name in ("a", "b"):  # the rows picked, so a loose filter cannot pick silently
        for row in picked[name]:
            print(f"{name.upper()}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in stats)
                  + f" (sets {', '.join(sorted(row['by_seed'], key=int))})")
    n = len(res["seeds"])
    print(f"B - A on A_r over {n} forget sets (seeds {', '.join(res['seeds'])}): {res['mean']:+.2f} points, "
          f"95% interval [{res['low']:+.2f}, {res['high']:+.2f}]; B kept more on {res['b_better']} of {n}")
    print("per set: " + ", ".join(f"{s}: {d:+.2f}" for s, d in zip(res["seeds"], res["diffs"], strict=True)))
    print(f"A_f A: {res['A_f']['a']}\nA_f B: {res['A_f']['b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Add the forget AUC (core.audit.mia, December 2026) to bench rows saved before it existed.

For each row of a bench JSONL file that lacks `mia_auc` and whose run folder still exists, the saved
unlearned weights and the retrained reference are measured again on the run's own rows, exactly as the run
did. The row gets `mia_auc` only if the measurement repeats the row's test accuracy and both member
rates; otherwise the row is left as it was and the script says so. Nothing is trained.

    python bench/backfill_mia_auc.py bench/results/bench-v22-intel.jsonl

The file is rewritten in place (atomically), rows in their order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def remeasure(run_dir: Path) -> tuple[dict, dict]:
    """(the unlearned model's accuracies, the retrain reference) of a saved run, measured again."""
    import torch

    from core import runs
    from core.engine import load_unlearned
    from core.pipeline import RunRequest, measure, resolve, retrain_reference, summarise
    from core.train import prepare_model

    meta = json.loads((run_dir / "run.json").read_text())
    res = resolve(RunRequest(**meta["request"]))
    model = prepare_model(load_unlearned(run_dir), res.device).eval()
    with torch.no_grad():
        after = measure(model, res)
    accs = summarise(after, res)
    ref = retrain_reference(res, after, accs, Path(meta["request"]["runs_root"]) / runs.CACHE_DIR)
    return accs, ref


def backfill(row: dict) -> str:
    """Fill row["mia_auc"] in place when the run can be measured again and repeats the row; say what happened."""
    run_dir = Path(row.get("run_dir") or "")
    if row.get("mia_auc") is not None or not row.get("mia"):
        return "kept"
    if not (run_dir / "run.json").exists():
        return "no run folder"
    accs, ref = remeasure(run_dir)
    if ref is None:
        return "no retrained reference"
    same = (abs(accs["test_acc"] - row["test_acc"]) < 1e-9
            and all(abs(ref["mia_forget_member_rate"][m] - row["mia"][m]) < 1e-9 for m in ("retrain", "unlearned")))
    if not same:
        return (f"differs (test {accs['test_acc']} vs {row['test_acc']}, member rates "
                f"{ref['mia_forget_member_rate']} vs {row['mia']}): left alone")
    row["mia_auc"] = ref["mia_forget_auc"]
    return "filled"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    for row in rows:
        print(row.get("label"), row.get("k"), row.get("seed"), backfill(row), flush=True)
    tmp = args.jsonl.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far past the boundary are the forgotten images? Forget-set margins of saved runs, in float32 and bfloat16.

The engine stops at the first step where every forget image is misclassified in float32, so some images end just
past the boundary. This reads saved runs and reports, per run, each forget image's margin (true-class logit minus
the best other logit; below 0 = forgotten) through the prediction path: how many are within 0.1 of the boundary,
and how many a bfloat16 evaluation of the same model recognises again.

    python bench/forget_margins.py RUN_DIR [RUN_DIR ...] [--data-dir DIR] --out bench/results/forget-margins.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.engine import load_unlearned  # noqa: E402
from core.methods import true_and_best_other  # noqa: E402
from core.models import trunk_dtype  # noqa: E402
from core.pipeline import cached_dataset  # noqa: E402
from core.train import to_device_format  # noqa: E402

NEAR = 0.1  # logits: "just past the boundary"


def margins(run_dir: Path, data_dir: str | None = None) -> dict:
    """The run's forget-set margins in float32 and bfloat16 (training-set forget images only; uploads are not saved
    with their pixels in a form this reads)."""
    run = json.loads((run_dir / "run.json").read_text())
    ds = cached_dataset(run["dataset"]["name"], data_dir)
    position = {int(i): p for p, i in enumerate(ds.train.ids.tolist())}
    rows = torch.tensor([position[int(i)] for i in run["all_forget_ids"]])
    x, y = to_device_format(ds.train.images(rows), torch.device("cpu")), ds.train.labels[rows]
    model = load_unlearned(run_dir)
    out = {"run": run_dir.name, "method": run["method"], "k": run["k"], "seed": run["seed"]}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.no_grad(), trunk_dtype(dtype):
            z = model.classify(model.features(x)).float()
        true, best_other = true_and_best_other(z, y)
        out[name] = (true - best_other).numpy()
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | method | k | seed | recognised (fp32) | median margin | within 0.1 | recognised (bf16) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, b = r["fp32"], r["bf16"]
        lines.append(f"| {r['run']} | {r['method']} | {r['k']} | {r['seed']} | {int((f > 0).sum())} of {len(f)} | "
                     f"{np.median(f):.2f} | {int(((f > -NEAR) & (f <= 0)).sum())} | {int((b > 0).sum())} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="saved run folders (run.json, model.safetensors, ...)")
    ap.add_argument("--data-dir", help="the dataset folder the runs used, if not the default")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    text = f"Command: `python bench/forget_margins.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n" \
           + table([margins(d, args.data_dir) for d in args.runs]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

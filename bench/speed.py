"""Time StructGuard at k=32 the two ways a user meets it, and write the phases.

cold: `python -m core unlearn --method structguard --k 32 --seed 0 --json` in a fresh process
      (the runs folder already holds the original model's cached outputs, as after a first run;
      the very first run in a new runs folder also pays for measuring the original model).
warm: execute_run in a process that has already done one run (model, data, encoder and the
      original's outputs loaded).
dashboard: what the dashboard's "Start" button costs since runs left the server's interpreter
      (issue 12): dashboard.worker.start with the fork server already started, from the call until the
      job shows as done (the result on the page); the drift map for the Audit page is fitted after that
      (in this process, as in the server), and its seconds are a column of their own.

    python bench/speed.py [--repeats 3] [--out bench/results/speed-k32.md]

Run it with nothing else on the machine: the numbers are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("proxy", "importance", "updates", "evaluation_before", "evaluation", "total")


def cold(runs: str, seed: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "core", "unlearn", "--method", "structguard", "--k", "32", "--seed",
                          str(seed), "--json", "--runs-dir", runs], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall": time.perf_counter() - t0, **{p: row["timings"].get(p, 0.0) for p in PHASES},
            "A_f": row["forget_acc"], "A_test": row["test_acc"], "steps": row["steps"]}


def dashboard_path(rows: list[dict], ids: list[int], warm_root: str, repeats: int) -> None:
    from core.pipeline import RunRequest
    from dashboard import worker
    from dashboard.jobs import Job

    def via_worker() -> dict:
        job, t0 = Job(token="speed", label="speed"), time.time()  # job.finished is a time.time() stamp
        worker.start([RunRequest(forget_ids=ids, method="structguard", runs_root=warm_root)], job).join()
        views = time.time() - job.finished if job.finished else 0.0
        if job.status != "done":
            raise RuntimeError(f"worker run {job.status}: {job.error}")
        meta = json.loads((job.run_dirs[0] / "run.json").read_text())
        return {"wall": job.finished - t0, "drift map": views, **{p: meta["timings"].get(p, 0.0) for p in PHASES},
                "A_f": meta["metrics"]["after"]["forget_acc"], "A_test": meta["metrics"]["after"]["test_acc"],
                "steps": meta["steps"]}

    via_worker()  # starts the fork server (it preloads torch, core and the data) and compiles UMAP here
    for _ in range(repeats):
        rows.append(via_worker())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/speed-k32.md")
    p.add_argument("--no-dashboard", action="store_true",
                   help="skip the dashboard path (a machine without streamlit, such as the lent GPU machine)")
    args = p.parse_args()
    import torch

    from core.cli_unlearn import random_forget_ids
    from core.pipeline import RunRequest, execute_run

    rows: dict[str, list[dict]] = {"cold (first run in a new runs folder)": [], "cold": [], "warm": [],
                                   "dashboard (worker process)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            fresh = str(Path(tmp) / f"fresh{i}")
            rows["cold (first run in a new runs folder)"].append(cold(fresh, 0))
            rows["cold"].append(cold(fresh, 0))
        ids = random_forget_ids("fashion-mnist", None, 32, 0)
        warm_root = str(Path(tmp) / "warm")
        execute_run(RunRequest(forget_ids=ids, method="structguard", runs_root=warm_root))  # loads everything
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run = execute_run(RunRequest(forget_ids=ids, method="structguard", runs_root=warm_root))
            meta = json.loads((run / "run.json").read_text())
            rows["warm"].append({"wall": time.perf_counter() - t0,
                                 **{p: meta["timings"].get(p, 0.0) for p in PHASES},
                                 "A_f": meta["metrics"]["after"]["forget_acc"],
                                 "A_test": meta["metrics"]["after"]["test_acc"], "steps": meta["steps"]})
        if args.no_dashboard:
            del rows["dashboard (worker process)"]
        else:
            dashboard_path(rows["dashboard (worker process)"], ids, warm_root, args.repeats)
    from core.models import pick_device

    device = pick_device()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Command: `python bench/speed.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, device {device} "
             f"({where}), {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {args.repeats} "
             "(min-max).",
             "",
             "| path | wall s | execute_run s | proxy | importance | updates | eval (original) | eval (unlearned) "
             "| steps | A_f | A_test | drift map, after the result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    for name, rs in rows.items():
        cols = [med([r[c] for r in rs]) for c in ("wall", "total", "proxy", "importance", "updates",
                                                    "evaluation_before", "evaluation", "steps")]
        views = med([r["drift map"] for r in rs]) if "drift map" in rs[0] else ""
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {rs[0]['A_f']:.1f} | {rs[0]['A_test']:.2f} | {views} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

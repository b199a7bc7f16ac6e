"""`python -m core bench`: a grid of methods (and variants) x k x seeds -> a markdown table and JSONL rows.

Each (method, k, seed) is one cell, run by core.sweep on the local backend (one after another) or on
Ray (one task each). A cell's run records its cell key, so `--resume` finds the cells whose run
directory is already complete and runs only the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import runs
from .cli import command
from .cli_unlearn import CONFIG_FLAGS, _request_args, build_request, result_row
from .engine import UnlearnError
from .methods import METHODS
from .sweep import Outcome, SweepError, add_backend_args, backend_from_args, run_cells

# Bench variants: "method" or "method:variant"; each variant is a set of config overrides. "polish" is the option
# that held-out sets favoured at k=32 but that costs twice the steps (docs/METHOD.md v19-v20), reported beside it.
VARIANTS: dict[str, dict] = {"": {}, "paper": {"schedule": "paper"}, "no-sa": {"sa": False},
                             "no-sr": {"sr": False}, "no-cr": {"cr": False}, "no-mix": {"mix_weight": 0.0},
                             "polish": {"polish_steps": 100}}
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def t95(n: int) -> float:
    """The two-sided 95 % Student t quantile for a mean of n values (n - 1 degrees of freedom). The table up to
    n = 10; beyond it the Cornish-Fisher expansion around 1.96, within 0.003 of the exact value (a normal 1.96
    would make the interval 8 % too narrow at 16 sets)."""
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    if n in _T95:
        return _T95[n]
    z, df = 1.959964, n - 1
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


# The request fields that make two runs of the same (method, k, seed) different experiments.
CELL_FIELDS = ("model", "dataset", "data_dir", "encoder", "clip_checkpoint", "anchors", "retain_eval", "eval_precision",
               "no_sa", "no_sr", "no_cr") + CONFIG_FLAGS


def _bench_args(p: argparse.ArgumentParser) -> None:
    _request_args(p)
    p.add_argument("--methods", default="neggrad,adv,l2ul,structguard,structguard:paper,structguard:no-sa,"
                                        "structguard:no-sr,structguard:no-cr",
                   help="methods, each optionally with a variant: " + ", ".join(v for v in VARIANTS if v))
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/BENCHMARKS-results.md", help="markdown table to write")
    p.add_argument("--jsonl", default=None, help="also append one JSON row per run here (a failed run: its error)")
    p.add_argument("--from-jsonl", default=None, help="run nothing: write the table from rows saved with --jsonl "
                                                      "(for example by several bench processes)")
    p.add_argument("--resume", action="store_true",
                   help="skip the cells whose run is already complete in the runs folder (same settings); "
                        "their rows come from those runs and are not appended to --jsonl again")
    add_backend_args(p)


@dataclass(frozen=True)
class BenchCell:
    """One bench run; everything a Ray worker needs to build its request (the parsed flags are plain values)."""

    label: str
    k: int
    seed: int
    args: argparse.Namespace

    @property
    def key(self) -> str:
        """Names the experiment: the label, k, seed and a hash of every flag that changes the run."""
        settings = {f: getattr(self.args, f, None) for f in CELL_FIELDS}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{self.label}/k{self.k}/s{self.seed}/{digest}"


def _fmt(values: list[float], ci: bool = False, digits: int = 2) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    mean, sd = statistics.mean(vals), statistics.stdev(vals)
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}"
    if ci:
        half = t95(len(vals)) * sd / len(vals) ** 0.5
        text += f" [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
    return text


def _mia(rows: list[dict], model: str) -> str:
    """The forget member rate and the threshold-free forget AUC (core.audit.mia) of `model` ("unlearned" or
    "retrain"); rows made before the AUC existed give n/a for it."""
    rate = _fmt([r["mia"][model] if r.get("mia") else None for r in rows])
    return f"{rate}; {_fmt([r['mia_auc'][model] if r.get('mia_auc') else None for r in rows])}"


def _variant(spec: str) -> tuple[str, dict]:
    method, _, variant = spec.partition(":")
    if method not in METHODS or variant not in VARIANTS:
        raise UnlearnError(f"unknown bench entry {spec!r}: use a method ({', '.join(METHODS)}) optionally "
                           f"followed by :{', :'.join(v for v in VARIANTS if v)}")
    return method, VARIANTS[variant]


def bench_row(run_dir: Path, label: str) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    row = dict(result_row(run_dir), label=label)
    ref = meta["metrics"].get("retrain")
    row["retrain"] = ref and {k: ref[k] for k in ("forget_acc", "retain_acc", "test_acc")}
    row["tug_of_war"] = ref["tug_of_war"] if ref else None
    row["gap_test"] = ref["gap"]["test_acc"] if ref else None
    row["mia"] = ref["mia_forget_member_rate"] if ref else None
    row["mia_auc"] = ref.get("mia_forget_auc") if ref else None  # absent from runs before December 2026's v23
    row["term_shares"], row["importance"] = meta.get("term_shares"), meta.get("importance")
    row["cell"] = meta.get("request", {}).get("bench_cell")
    row["precision"] = meta.get("precision")
    row["polish"] = meta.get("polish")  # with polish steps: the first forgotten step and the step returned
    row["eval_precision"] = meta.get("eval_precision", "fp32")  # runs before the option measured in float32
    return row


def worker_stats() -> dict:
    """Which process ran a cell and how often it has loaded the dataset and the model (once is the goal)."""
    import torch

    from .pipeline import _cached_dataset, _cached_model

    return {"pid": os.getpid(), "threads": torch.get_num_threads(),
            "dataset_loads": _cached_dataset.cache_info().misses, "model_loads": _cached_model.cache_info().misses}


def bench_cell(cell: BenchCell) -> dict:
    """Run one cell (in this process or in a Ray worker) and return its bench row."""
    from .pipeline import execute_run

    method, overrides = _variant(cell.label)
    request = build_request(cell.args, method, cell.k, cell.seed)
    request.config = dict(request.config, **overrides)
    request.bench_cell = cell.key
    return dict(bench_row(execute_run(request), cell.label), worker=worker_stats())


def error_row(cell: BenchCell, error: str) -> dict:
    return {"label": cell.label, "method": cell.label.partition(":")[0], "k": cell.k, "seed": cell.seed,
            "cell": cell.key, "error": error}


def completed_cells(root: Path) -> dict[str, Path]:
    """Cell key -> run directory, for the complete runs under `root` that a bench made."""
    found: dict[str, Path] = {}
    for info in runs.list_runs(root):
        if info.ok and (key := (info.meta or {}).get("request", {}).get("bench_cell")):
            found.setdefault(key, info.path)
    return found


def bench_table(rows: list[dict], labels: list[str], ks: list[int]) -> list[str]:
    """Mean ± std (A_test also its 95% t-interval) over seeds, per k and method, with the references."""
    rows = [r for r in rows if not r.get("error")]
    lines = ["| k | method | A_f | A_r | A_test [95% CI] | A_test - retrain | Tug-of-War | "
             "MIA forget: member rate; AUC vs test | affinity cos | forgot | steps (precision) | "
             "seconds (proxy / importance / updates / eval) | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        group = [r for r in rows if r["k"] == k]
        if not group:
            continue
        firsts = [r for r in group if r["label"] == group[0]["label"]]
        # the original's numbers differ across seeds only in A_f (another forget set) and A_r (another retain rest)
        accs = [_fmt(v[:1] if len(set(v)) == 1 else v)
                for v in ([r["before"][c] for r in firsts] for c in ("forget_acc", "retain_acc", "test_acc"))]
        lines.append(f"| {k} | original | {accs[0]} | {accs[1]} | {accs[2]} | | | | 1 | | | | |")
        refs = [r for r in firsts if r["retrain"]]
        if refs:
            accs = [_fmt([r["retrain"][c] for r in refs]) for c in ("forget_acc", "retain_acc", "test_acc")]
            lines.append(f"| {k} | retrain ({len(refs)} of {len(firsts)} seeds) | {accs[0]} | {accs[1]} | {accs[2]} "
                         f"| 0 | 1 | {_mia(refs, 'retrain')} | | | | | |")
        for label in labels:
            rs = [r for r in group if r["label"] == label]
            if not rs:
                continue
            t = [r["timings"] for r in rs]
            phases = [[x.get("proxy") for x in t], [x.get("importance") for x in t], [x.get("updates") for x in t],
                      [x.get("evaluation", 0) + x.get("evaluation_before", 0) for x in t]]
            secs = f"{_fmt([r['seconds'] for r in rs], digits=1)} (" + " / ".join(
                _fmt(v, digits=1) for v in phases) + ")"
            forgot = sum(r["forget_acc"] == 0.0 for r in rs)
            # the number format of the update steps, chosen per method and k: it explains much of the seconds
            precision = "/".join(sorted({r["precision"] for r in rs if r.get("precision")}))
            steps = _fmt([r["steps"] for r in rs], digits=0) + (f" ({precision})" if precision else "")
            lines.append(
                f"| {k} | {label} | {_fmt([r['forget_acc'] for r in rs])} | {_fmt([r['retain_acc'] for r in rs])} | "
                f"{_fmt([r['test_acc'] for r in rs], ci=True)} | {_fmt([r['gap_test'] for r in rs])} | "
                f"{_fmt([r['tug_of_war'] for r in rs], digits=3)} | "
                f"{_mia(rs, 'unlearned')} | "
                f"{_fmt([r['structure_score'] for r in rs], digits=3)} | {forgot}/{len(rs)} | "
                f"{steps} | {secs} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    return lines


def _print_row(row: dict) -> None:
    if row.get("error"):
        tqdm.write(f"{row['label']:20} k={row['k']:<4} seed={row['seed']} FAILED: {row['error']}")
        return
    tow = row["tug_of_war"] if row["tug_of_war"] is not None else float("nan")
    tqdm.write(f"{row['label']:20} k={row['k']:<4} seed={row['seed']} A_f {row['forget_acc']:6.2f} "
               f"A_r {row['retain_acc']:6.2f} A_test {row['test_acc']:6.2f} ToW {tow:.3f} "
               f"steps {row['steps']} {row['seconds']:.0f}s")


@command("bench", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a grid of methods (and variants) x k x seeds; write a markdown table (mean ± std over seeds)."""
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    for label in labels:
        _variant(label)
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    backend = backend_from_args(args)
    if args.backend == "ray" and not args.from_jsonl:
        from .sweep import import_ray

        import_ray()  # before anything runs: say how to install it
    rows: list[dict] = []
    wall = None
    interrupted = False
    if args.from_jsonl:
        saved = [json.loads(line) for line in Path(args.from_jsonl).read_text().splitlines() if line.strip()]
        rows = [r for r in saved if r["k"] in ks and r["seed"] in seeds and r.get("label") in labels]
    else:
        cells = [BenchCell(label, k, seed, args) for k in ks for seed in seeds for label in labels]
        done = completed_cells(runs.runs_root(args.runs_dir)) if args.resume else {}
        todo = [c for c in cells if c.key not in done]
        if args.resume:
            print(f"resume: {len(cells) - len(todo)} of {len(cells)} cells already complete", file=sys.stderr)
        found = {c.key: bench_row(done[c.key], c.label) for c in cells if c.key in done}

        def finished(i: int, outcome: Outcome) -> None:
            row = outcome.value if outcome.error is None else error_row(todo[i], outcome.error)
            found[todo[i].key] = row
            _print_row(row)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

        sweep = run_cells("core.cli_bench:bench_cell", todo, backend, finished)
        wall, interrupted = sweep.wall_s, sweep.interrupted
        rows = [found[c.key] for c in cells if c.key in found]  # the grid's order, whatever order cells finished in
    ok = [r for r in rows if not r.get("error")]
    failed = [r for r in rows if r.get("error")]
    first = ok[0] if ok else {}
    threads = sorted({r["worker"].get("threads") for r in ok if r.get("worker", {}).get("threads")})
    precisions = ", ".join(sorted({r["precision"] for r in ok if r.get("precision")}))
    measured = ", ".join(sorted({r.get("eval_precision") or "fp32" for r in ok}))
    header = (f"Command: `python -m core {' '.join(sys.argv[1:])}`\n\n"
              f"Device: {first.get('device', '?')}; backend: {getattr(args, 'backend', 'local')}"
              f"{f' (torch threads per run: {threads})' if threads else ''}"
              f"{f'; update steps in {precisions} (per method in the steps column)' if precisions else ''}"
              f"{f'; retain and test rows measured in {measured} (forget set: fp32)' if measured else ''}; anchors: "
              f"{first.get('encoder', '?')}; A_r on the retain {first.get('retain_set', '?')}; mean ± std over "
              f"seeds {seeds} (A_test also its 95% t-interval); retrain: the base recipe trained without the forget "
              f"set (bench/retrain), where one exists; runs took {sum(r['seconds'] for r in ok):.0f} s in all"
              f"{f', {wall:.0f} s of wall time' if wall is not None else ''}.\n\n")
    lines = bench_table(rows, labels, sorted({r["k"] for r in ok}))
    if failed:
        lines += ["", f"Failed ({len(failed)}):"] + [f"- {r['label']} k={r['k']} seed={r['seed']}: {r['error']}"
                                                      for r in failed]
    if interrupted:
        lines += ["", f"Interrupted: {len(rows)} of {len(ks) * len(seeds) * len(labels)} cells finished."]
    text = header + "\n".join(lines) + "\n"
    runs.write_atomic(Path(args.out), text, what="the bench table")
    print(text)
    if interrupted:
        print("cancelled: the finished rows are in the table", file=sys.stderr)
        return 130
    return 1 if failed else 0


__all__ = ["VARIANTS", "BenchCell", "SweepError", "bench_cell", "bench_row", "bench_table", "completed_cells"]

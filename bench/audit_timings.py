"""Time every audit computation (median of 3) on real arrays; write bench/results/audit_timings.md.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/audit_timings.py [--points 2000] [--run runs/<id>]

Features come from the sample model on Fashion-MNIST test images (points/10 per class).
Timeline snapshots come from --run when given (its stored snapshots, tiled to --points),
else 20 snapshots made by shrinking the real features towards their mean.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core import figures as F  # noqa: E402
from core.audit import (  # noqa: E402
    anchor_similarity,
    class_mean_affinity,
    confidence_mia,
    embedding_drift,
    project_snapshots,
    row_cosine,
    sample_affinity,
    warm_up,
)
from core.audit.gradcam import grad_cam_before_after, overlay  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.models import load_model  # noqa: E402


def median_of(fn, n: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def fresh_process_warmup() -> float:
    """umap's first fit in a new process (import + numba compile/cache load), timed in a subprocess."""
    code = ("import time; t=time.perf_counter(); import core.audit.drift as d; d.warm_up(); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_resnet18_narrow", help="sample model name or card path")
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--run", default=None, help="a run directory: real snapshots + full report timing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_timings.md"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model = load_model(args.model).model.eval()
    ds = load_dataset("fashion-mnist")
    per = args.points // 10
    rows = torch.cat([torch.nonzero(ds.test.labels == c).squeeze(1)[:per] for c in range(10)])
    x, y = ds.test.images(rows), ds.test.labels[rows].numpy()
    with torch.no_grad():
        fb = torch.cat([model.features(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
    groups = np.array(["test"] * len(y))
    groups[:16] = "forget"
    rng = np.random.default_rng(0)
    fa = fb + rng.normal(scale=0.2 * fb.std(), size=fb.shape).astype(np.float32)
    if args.run:
        with np.load(Path(args.run) / "audit.npz") as z:
            snaps = z["snapshots"]
        reps = int(np.ceil(len(fb) / snaps.shape[1]))
        snaps = np.tile(snaps, (1, reps, 1))[:, :len(fb)]
        snap_src = f"{snaps.shape[0]} real snapshots of {args.run}, tiled to {len(fb)} points"
    else:
        alphas = np.linspace(0, 0.9, args.snapshots)[:, None, None]
        snaps = ((1 - alphas) * fb[None] + alphas * fb.mean(0)).astype(np.float16)
        snap_src = f"{args.snapshots} synthetic snapshots (features shrunk towards their mean)"
    a = rng.normal(size=(10, 384)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    from core.engine import anchor_map
    R = anchor_map(fb.shape[1], 384).numpy()

    results: list[tuple[str, float, list[float], str]] = []

    def add(name: str, fn, note: str = "") -> object:
        box = {}
        med, times = median_of(lambda: box.__setitem__("v", fn()))
        results.append((name, med, times, note))
        print(f"{name:55s} {med:7.3f} s  {[f'{t:.3f}' for t in times]}", flush=True)
        return box["v"]

    warm = [fresh_process_warmup() for _ in range(3)]
    results.append(("UMAP warm-up in a fresh process (import + first fit)", statistics.median(warm), warm,
                    "paid once per process: call core.audit.warm_up() at start-up"))
    print(f"warm-up {warm}", flush=True)
    warm_up()
    n = len(fb)
    drift, red = add(f"drift UMAP, {n} points (fit + place before and after)",
                     lambda: embedding_drift(fb, fa, y, groups, n_classes=10, method="umap"),
                     "target: <= 5 s after warm-up")
    add(f"drift PCA, {n} points", lambda: embedding_drift(fb, fa, y, groups, n_classes=10, method="pca"))
    frames = add(f"timeline placement, {snaps.shape[0]} x {n} points", lambda: project_snapshots(red, snaps),
                 snap_src)
    add(f"affinity: S_ori, S_unl, row cosine, class means ({n} x 10)", lambda: (
        anchor_similarity(a), row_cosine(sample_affinity(fb, a, R), s2 := sample_affinity(fa, a, R)),
        class_mean_affinity(s2, y, 10)))
    xs, ys = x[:8], y[:8]
    cams = add("Grad-CAM before + after, 8 images (captum, CPU)",
               lambda: grad_cam_before_after(model, model, xs, ys, batch_size=8))
    with torch.no_grad():
        conf_t = torch.softmax(torch.cat([model(ds.test.images(torch.arange(i, min(i + 1000, 10000))))
                                          for i in range(0, 10000, 1000)]), 1)
        conf_t = conf_t.gather(1, ds.test.labels[:, None])[:, 0].numpy()
    add("membership inference (5,000 retain vs 10,000 test scores)",
        lambda: confidence_mia(rng.choice(conf_t, 5000), conf_t, conf_t[:16]), "calibration + forget rate")
    s_ori, s_unl = sample_affinity(fb, a, R), sample_affinity(fa, a, R)
    add("all figure builders (drift, timeline, heatmaps, Grad-CAM, bars)", lambda: [
        F.drift_scatter(drift.before, drift.after, y, groups), F.drift_class_bars(drift.per_class),
        F.drift_timeline(frames, list(range(len(frames))), y, groups),
        F.affinity_heatmaps(s_ori, s_unl, y, groups), F.anchor_similarity_heatmap(anchor_similarity(a)),
        F.class_mean_heatmaps(class_mean_affinity(s_ori, y, 10), class_mean_affinity(s_unl, y, 10)),
        F.row_cosine_histogram(row_cosine(s_ori, s_unl), groups),
        F.gradcam_gallery(xs.numpy(), overlay(xs, cams[0].cams), overlay(xs, cams[1].cams), ["x"] * 8)])
    if args.run:
        from core.report import build_report
        out = Path("/tmp/audit_bench_report.html")
        add(f"full HTML report of {Path(args.run).name} (no PNG)", lambda: build_report(args.run, out),
            "includes model + dataset loading for Grad-CAM")

    cmd = "HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/audit_timings.py " + shlex.join(sys.argv[1:])
    load = os.getloadavg()
    lines = [
        "# Audit computation timings",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the cores are shared, so "
        "numbers are upper bounds). Generated " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + ".",
        "",
        f"Features: model `{args.model}`, {n} Fashion-MNIST test images ({per} per class), "
        f"{fb.shape[1]}-d. Median of 3 runs.",
        "",
        "| computation | median (s) | runs (s) | note |",
        "| --- | ---: | --- | --- |",
    ]
    for name, med, times, note in results:
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{t:.2f}' for t in times)} | {note} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

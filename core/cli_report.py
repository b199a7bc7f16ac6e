"""`python -m core report RUN_DIR [-o FILE] [--png-dir DIR]`: the self-contained HTML audit report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import _device_arg, command
from .runs import check_run


def _report_args(p: argparse.ArgumentParser) -> None:
    _device_arg(p)
    p.add_argument("run_dir", help="a run directory (runs/<run_id>)")
    p.add_argument("-o", "--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--png-dir", default=None, help="also export every figure as PNG here (needs Chromium)")
    p.add_argument("--drift", default="auto", choices=["auto", "umap", "pca"], help="2-D map for the drift figures")
    p.add_argument("--drift-space", default="prediction", choices=["backbone", "prediction"],
                   help="features for the drift map: the prediction path (default; after StructGuard's projector, "
                        "which starts as the identity; the same space as the timeline) or the backbone h(x)")
    p.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (no model or data loading)")
    p.add_argument("--gradcam-images", type=int, default=4, help="forget images in the Grad-CAM gallery")


def check_run_dir(run_dir: Path) -> None:
    """Refuse what is not a complete run (core.runs.check_run, the listing's own test): one line, exit 2.
    build_report itself still reports what it can of a damaged run (the library call)."""
    check_run(run_dir)


@command("report", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML audit report of a run (opens offline)."""
    from .report import build_report

    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    result = build_report(run_dir, args.out, png_dir=args.png_dir, drift_method=args.drift,
                          drift_space=args.drift_space, gradcam=not args.no_gradcam,
                          n_gradcam=args.gradcam_images, device=args.device,
                          progress=lambda s: print(f"  {s} ...", file=sys.stderr))
    size = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size:.1f} MB, {len(result.figures)} figures)")
    if result.missing:
        print("missing or incomplete:", *[f"  - {m}" for m in dict.fromkeys(result.missing)], sep="\n")
    if args.png_dir is not None:
        print(result.png_note)
    return 0

"""Run directories: written atomically, listed (damaged ones as damaged), loaded, deleted, traced."""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_FILES = ("run.json", "audit.npz", "model.safetensors", "model.json")
# A run builds its folder (.<run_id>.partial) only while saving, its last few seconds, then renames it
# into place; one older than an hour belongs to a killed process, never to a run still saving.
PARTIAL_MAX_AGE_S = 3600


class RunError(RuntimeError):
    """A run directory is missing or damaged; the message says which part."""


def runs_root(root: str | Path | None = None) -> Path:
    """`root`, else $STRUCTGUARD_RUNS, else ./runs under the project."""
    if root:
        return Path(root)
    env = os.environ.get("STRUCTGUARD_RUNS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "runs"


def new_run_id(method: str, k: int, seed: int, root: Path) -> str:
    base = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{method}-k{k}-s{seed}"
    run_id, n = base, 1
    while (root / run_id).exists() or (root / f".{run_id}.partial").exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def partial_dir(root: Path, run_id: str) -> Path:
    """Where a run is built; renamed to root/run_id only when complete."""
    path = root / f".{run_id}.partial"
    path.mkdir(parents=True, exist_ok=False)
    return path


def finalize(partial: Path, meta: dict, audit: dict[str, np.ndarray]) -> Path:
    """Write run.json and audit.npz into the partial directory, then rename it into place."""
    np.savez_compressed(partial / "audit.npz", **audit)
    meta = dict(meta, status="complete")
    (partial / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    final = partial.parent / partial.name[1:].removesuffix(".partial")
    os.replace(partial, final)
    return final


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@dataclass
class RunInfo:
    run_id: str
    path: Path
    status: str  # "complete" or "damaged"
    meta: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


@dataclass
class RunRecord:
    path: Path
    meta: dict
    audit: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # parts that could not be read

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.name)


def _check(path: Path) -> tuple[dict | None, str | None]:
    try:
        meta = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        return None, "run.json is missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"run.json is not valid JSON ({exc})"
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        return (meta if isinstance(meta, dict) else None), "run.json does not mark the run complete"
    missing = [f for f in REQUIRED_FILES[1:] if not (path / f).is_file()]
    if missing:
        return meta, f"missing {', '.join(missing)}"
    return meta, None


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Every run directory, newest first; unreadable ones are listed as damaged, never raised."""
    root = runs_root(root)
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        meta, error = _check(path)
        out.append(RunInfo(path.name, path, "damaged" if error else "complete", meta, error))
    return sorted(out, key=lambda r: r.run_id, reverse=True)


def load_run(run_dir: str | Path, strict: bool = False) -> RunRecord:
    """The run's metadata and audit arrays. Damaged parts are listed in `.missing`
    (or raised with strict=True); only an unreadable run.json always raises."""
    path = Path(run_dir)
    try:
        meta = json.loads((path / "run.json").read_text())
    except FileNotFoundError as exc:
        raise RunError(f"{path} is not a run directory: run.json is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}/run.json is damaged: {exc}") from exc
    record = RunRecord(path, meta)
    if meta.get("status") != "complete":
        record.missing.append("status: the run did not complete")
    try:
        with np.load(path / "audit.npz", allow_pickle=False) as z:
            record.audit = {k: z[k] for k in z.files}
    except FileNotFoundError:
        record.missing.append("audit.npz (audit arrays)")
    except Exception as exc:  # zipfile/numpy raise several types for damaged archives
        record.missing.append(f"audit.npz is damaged ({exc})")
    for f in ("model.safetensors", "model.json"):
        if not (path / f).is_file():
            record.missing.append(f)
    if strict and record.missing:
        raise RunError(f"{path} is damaged: {'; '.join(record.missing)}")
    return record


def delete_run(run_dir: str | Path, root: str | Path | None = None) -> None:
    """Remove a run directory; refuses anything outside the runs root."""
    root = runs_root(root).resolve()
    path = Path(run_dir).resolve()
    if path.parent != root:
        raise RunError(f"{path} is not a run inside {root}")
    shutil.rmtree(path)


def lineage(run_dir: str | Path) -> list[dict]:
    """The chain of runs from the first request to this one (oldest first)."""
    chain, path, seen = [], Path(run_dir), set()
    while path is not None and path.name not in seen:
        seen.add(path.name)
        try:
            meta = json.loads((path / "run.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            chain.append({"run_id": path.name, "missing": True})
            break
        chain.append(meta)
        parent = meta.get("parent_run")
        path = (path.parent / parent) if parent else None
    return chain[::-1]


def clean_partials(root: str | Path | None = None, older_than_s: float = PARTIAL_MAX_AGE_S) -> int:
    """Delete leftovers of killed runs (.<run_id>.partial older than older_than_s); returns how many."""
    root = runs_root(root)
    if not root.is_dir():
        return 0
    n = 0
    for p in root.glob(".*.partial"):
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:  # removed meanwhile by another process cleaning the same root
            continue
        if p.is_dir() and age > older_than_s:
            discard(p)
            n += 1
    return n


def clean_partials_once(root: str | Path | None = None) -> int:
    """clean_partials at the start of a process (CLI command, dashboard): once per runs root and process;
    later calls return the first call's count and touch nothing (the dashboard re-runs app.py on every click)."""
    return _clean_once(str(runs_root(root).resolve()))


@functools.cache
def _clean_once(root: str) -> int:
    return clean_partials(root)

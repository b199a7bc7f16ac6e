"""Run a list of independent cells (one bench run, one tuning setting on one forget set) on a backend.

`local` runs them one after another in this process. `ray` makes each cell one Ray task, on a Ray
runtime started here (as many CPUs as `workers`) or on a cluster (`address`). A cell's function is
named "module:function" so that Ray workers import it (and keep whatever that module caches: the
dataset, the model, the text encoder) instead of receiving a copy with every task.

A cell that raises gives an `Outcome` with its error; the sweep goes on. Ctrl+C cancels what has not
finished and returns what has. Results come back in the order of the cells, whatever order they finish in.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("local", "ray")
INSTALL_RAY = "pip install -r requirements-ray.txt -c requirements-lock.txt -c requirements-dev-lock.txt"
# Results are small rows: the object store only has to hold them (Ray's default takes 30% of the memory).
OBJECT_STORE_BYTES = 128 * 1024 ** 2
# What a cluster's workers need from the driver's environment (a local runtime inherits all of it).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME")


class SweepError(RuntimeError):
    """A backend that cannot be used as asked (Ray missing, a cluster that cannot be reached)."""


@dataclass
class Backend:
    """Where cells run and with which resources; see `add_backend_args` for what each field means."""

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float = 0.0

    def threads(self) -> int | None:
        """torch threads per cell: the CPUs a cell was given (Ray: 1 by default); None = leave torch's default."""
        cpus = self.cpus_per_run if self.cpus_per_run is not None else (1 if self.name == "ray" else None)
        return None if cpus is None else max(1, int(cpus))


@dataclass
class Outcome:
    """One cell's result, or its error in one line."""

    value: Any = None
    error: str | None = None


@dataclass
class Sweep:
    outcomes: list[Outcome | None] = field(default_factory=list)  # None: not run (cancelled)
    interrupted: bool = False
    wall_s: float = 0.0


def add_backend_args(p: Any) -> None:
    """The backend options of `core bench` and `bench/tune.py`."""
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local (one run after another, default) or ray (one Ray task per run)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (e.g. ray://head:10001 or auto); default: start a local Ray runtime")
    p.add_argument("--workers", type=int, default=None,
                   help="CPUs of the local Ray runtime (default: this machine's CPU count)")
    p.add_argument("--cpus-per-run", type=float, default=None,
                   help="CPUs (and torch threads) per run; Ray default 1, local default: torch's own")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs per Ray task, e.g. 0.25 or 1 (CUDA only)")


def backend_from_args(args: Any) -> Backend:
    if args.backend != "ray" and (args.address or args.workers or args.gpus_per_run):
        raise SweepError("--address, --workers and --gpus-per-run are for --backend ray")
    if args.workers is not None and args.workers < 1:
        raise SweepError("--workers must be at least 1")
    for name in ("cpus_per_run", "gpus_per_run"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise SweepError(f"--{name.replace('_', '-')} cannot be negative")
    return Backend(args.backend, args.address, args.workers, args.cpus_per_run, args.gpus_per_run)


def resolve_function(spec: str) -> Callable[[Any], Any]:
    module, _, name = spec.partition(":")
    if str(ROOT) not in sys.path:  # Ray workers on a cluster: the project is at the same path on every node
        sys.path.insert(0, str(ROOT))
    return getattr(importlib.import_module(module), name)


def one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def call_cell(spec: str, cell: Any, threads: int | None) -> Outcome:
    """Run one cell; what it raises becomes its Outcome's error (the sweep goes on)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return Outcome(value=resolve_function(spec)(cell))
    except Exception as exc:  # noqa: BLE001 - any failure of one cell is recorded in its row
        return Outcome(error=one_line(exc))


def run_cells(spec: str, cells: Sequence[Any], backend: Backend,
              on_outcome: Callable[[int, Outcome], None] | None = None) -> Sweep:
    """Run `spec(cell)` for every cell; `on_outcome(index, outcome)` as each one finishes."""
    t0 = time.perf_counter()
    sweep = Sweep(outcomes=[None] * len(cells))
    report = on_outcome or (lambda i, o: None)

    def record(i: int, outcome: Outcome) -> None:
        sweep.outcomes[i] = outcome
        report(i, outcome)

    try:
        if backend.name == "ray":
            _run_ray(spec, cells, backend, record)
        else:
            resolve_function(spec)  # a wrong name fails once, not once per cell
            for i, cell in enumerate(cells):
                record(i, call_cell(spec, cell, backend.threads()))
    except KeyboardInterrupt:
        sweep.interrupted = True
    sweep.wall_s = time.perf_counter() - t0
    return sweep


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError(f"--backend ray needs Ray, which is not installed; install it with: {INSTALL_RAY}") from None
    return ray


def _run_ray(spec: str, cells: Sequence[Any], backend: Backend, record: Callable[[int, Outcome], None]) -> None:
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, backend)
    try:
        # max_calls=0: a worker process is reused for task after task, so what it loaded stays loaded
        # (Ray's default for GPU tasks is a fresh process per task).
        cpus = backend.cpus_per_run if backend.cpus_per_run is not None else 1
        task = ray.remote(max_calls=0, num_cpus=cpus, num_gpus=backend.gpus_per_run)(call_cell)
        index = {task.remote(spec, cell, backend.threads()): i for i, cell in enumerate(cells)}
        pending = list(index)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory)
                        outcome = Outcome(error=one_line(exc))
                    record(index[ref], outcome)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _init_ray(ray: Any, backend: Backend) -> None:
    options: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    if backend.address:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update({k: v for k, v in os.environ.items() if k.startswith("STRUCTGUARD_")})
        options["runtime_env"] = {"env_vars": env}
        where = f"the Ray cluster at {backend.address}"
    else:
        options.update(num_cpus=backend.workers or os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES)
        where = "a local Ray runtime"
    try:
        ray.init(address=backend.address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SweepError(f"could not start or reach {where}: {one_line(exc)}") from exc

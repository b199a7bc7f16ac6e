"""Imported once by the run workers' fork server (dashboard.worker): what every run needs, loaded
before any run forks from it. Failures are left to the run itself, which reports them to its user."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# One thread while preloading: a fork after OpenMP has started its thread pool hangs the child's first
# parallel operation (seen here with the dataset load). Each child sets THREADS again (dashboard.worker).
THREADS = torch.get_num_threads()
torch.set_num_threads(1)

from core import engine, pipeline  # noqa: E402,F401
from core.audit import views  # noqa: E402,F401

try:  # the drift map every dashboard run fits for the Audit page (core.audit.drift imports these lazily)
    import sklearn.decomposition  # noqa: E402,F401
    import sklearn.neighbors  # noqa: E402,F401
except Exception:  # noqa: BLE001 - the run reports it if it needs it
    pass

try:  # the default dataset and text encoder: a run that uses them starts warm
    from core.encoders import get_encoder

    pipeline.cached_dataset("fashion-mnist", None)
    get_encoder("auto").load()  # the model too, not only its cached anchors: a run may bring new texts
except Exception:  # noqa: BLE001 - the run loads (and reports) what it needs itself
    pass

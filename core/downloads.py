"""The one switch for downloads at run time (datasets and CLIP weights alike).

Nothing is downloaded unless the user opts in with STRUCTGUARD_ALLOW_DOWNLOADS=1, and
never while HF_HUB_OFFLINE is on (make, the dashboard, the tests and CI set it).
"""

from __future__ import annotations

import os

ALLOW_DOWNLOADS_ENV = "STRUCTGUARD_ALLOW_DOWNLOADS"
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


def env_flag(name: str) -> bool:
    """Whether an environment variable is set to a true value (1, true, yes, on; any case)."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def downloads_allowed() -> bool:
    """Downloads only on explicit opt-in, and never when HF_HUB_OFFLINE is on."""
    return env_flag(ALLOW_DOWNLOADS_ENV) and not env_flag("HF_HUB_OFFLINE")

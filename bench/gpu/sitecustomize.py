"""On the GPU machine only (PYTHONPATH=bench/gpu): serve MiniLM anchor vectors computed on the CPU machine.

Active when STRUCTGUARD_MINILM_TABLE names a table made by bench/gpu/make_minilm_table.py. Every Python
process there, the CLI's subprocesses too, then resolves the "minilm" encoder to those vectors; a text not in
the table is refused, so nothing is silently encoded differently.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_TABLE = os.environ.get("STRUCTGUARD_MINILM_TABLE")
if _TABLE:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import numpy as np

    from core import encoders

    _data = json.loads(Path(_TABLE).read_text())

    class PrecomputedMiniLM(encoders.TextEncoder):
        def __init__(self) -> None:
            super().__init__("minilm", _data["dim"], _data["detail"])

        def _embed(self, texts: list[str]) -> np.ndarray:
            missing = [t for t in texts if t not in _data["vectors"]]
            if missing:
                raise encoders.EncoderError(f"no precomputed MiniLM vector for {missing[0][:60]!r}")
            return np.asarray([_data["vectors"][t] for t in texts], dtype=np.float32)

        def _truncated(self, text: str) -> bool:
            return bool(_data["truncated"].get(text, False))

    encoders._load_minilm = PrecomputedMiniLM  # get_encoder("minilm") and "auto"'s fallback load this
    os.environ[encoders.TEXT_CACHE_ENV] = "off"  # the table is the one source: no vector from a disk cache

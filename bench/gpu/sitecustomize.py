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
            raise encoders.EncoderError(f"no precomputed MiniLM vector for {texts[0][:60]!r}")

        def truncated(self, text: str) -> bool:
            return bool(_data["truncated"].get(text, False))

    for _text, _vec in _data["vectors"].items():
        _row = np.asarray(_vec, dtype=np.float32)
        _row.setflags(write=False)
        encoders._EMBED_CACHE[("minilm", _text)] = _row
    encoders._load_minilm = PrecomputedMiniLM

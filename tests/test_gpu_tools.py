"""bench/gpu: the MiniLM anchor table carried to the lent GPU machine gives the same anchors as MiniLM here.

The GPU image has no MiniLM package, so its bench records rest on this stand-in: it must give the same vectors,
the same encoder name and anchor hash, and refuse a text it has no vector for rather than encode it differently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from core.anchors import build_anchor_set, load_anchor_texts
from core.data import FASHION_CLASSES
from core.encoders import get_encoder

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from core.anchors import build_anchor_set, load_anchor_texts
from core.data import FASHION_CLASSES
from core.encoders import EncoderError, get_encoder
enc = get_encoder("minilm")
texts = load_anchor_texts("fashion-mnist", list(FASHION_CLASSES))
a = build_anchor_set(texts, list(FASHION_CLASSES), enc)
try:
    enc.encode(["a text the table does not hold"])
    refused = False
except EncoderError:
    refused = True
print(json.dumps({"cls": type(enc).__name__, "hash": a.hash, "matrix": a.matrix.tolist(), "refused": refused}))
"""


def test_carried_minilm_table_gives_the_same_anchors(tmp_path):
    table = tmp_path / "minilm.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "bench/gpu/make_minilm_table.py", "--out", str(table)], cwd=ROOT, check=True,
                   capture_output=True, env=env)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(ROOT / "bench" / "gpu"), STRUCTGUARD_MINILM_TABLE=str(table)))
    carried = json.loads(out.stdout.strip().splitlines()[-1])
    here = build_anchor_set(load_anchor_texts("fashion-mnist", list(FASHION_CLASSES)), list(FASHION_CLASSES),
                            get_encoder("minilm"))
    assert carried["cls"] == "PrecomputedMiniLM"  # the stand-in served it, not the package
    assert carried["hash"] == here.hash
    assert torch.equal(torch.tensor(carried["matrix"]), here.matrix)
    assert carried["refused"]

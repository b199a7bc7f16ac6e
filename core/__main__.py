"""Command line: python -m core {info,train,retrain,evaluate,unlearn,bench,report,anchors} ..."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

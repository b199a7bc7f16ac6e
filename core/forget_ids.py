"""Forget-id files: the one parser the CLI (`unlearn --ids`, `retrain --ids`) and the dashboard share.

Accepted forms (UTF-8, at most MAX_BYTES):

- a JSON list of integers: `[3, 17, 42]`
- a JSON object with the list under `forget_ids` (as in run.json) or `ids`; the dashboard saves
  `{"dataset": "fashion-mnist", "split": "train", "ids": [...]}`, and a recorded dataset is checked
  against the one in use (`ForgetIdsFile.ids_for`)
- plain text: ids separated by newlines, commas or spaces; blank lines and `# comments` are ignored

Ids are training-image ids: non-negative whole numbers, each listed once. Whether they exist in
a dataset is checked where the dataset is loaded (core.pipeline.validate_forget_ids).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# 5 MB holds far more ids than any training set here (60k ids take about 400 kB as text);
# anything larger is the wrong file, and reading it would only cost memory.
MAX_BYTES = 5_000_000
FORMS = ('a JSON list such as [3, 17, 42], {"ids": [...]} (the dashboard\'s saved file), '
         '{"forget_ids": [...]}, or text with one id per line')

_TOKEN = re.compile(r"[,\s]+")


class ForgetIdsError(ValueError):
    """A forget-id list is missing or malformed; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ForgetIdsFile:
    """The ids of a forget-id file in file order, and the dataset it names (if it names one)."""

    ids: list[int]
    dataset: str | None = None
    source: str = "the id list"

    def ids_for(self, dataset: str | None) -> list[int]:
        """The ids, after checking that a file which names its dataset names this one."""
        if dataset is not None and self.dataset is not None and self.dataset != dataset:
            raise ForgetIdsError(f"{self.source} lists ids of dataset {self.dataset!r}, but this run uses "
                                 f"{dataset!r}; use a list made for {dataset!r} or pick the matching dataset")
        return list(self.ids)


def parse_forget_ids_file(data: str | bytes, source: str = "the id list") -> ForgetIdsFile:
    """Parse the text (or bytes) of a forget-id file; raises ForgetIdsError with what to fix."""
    if len(data) > MAX_BYTES:
        raise ForgetIdsError(f"{source} is {len(data):,} bytes, more than the {MAX_BYTES:,} an id list may have; "
                             f"is it the right file?")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")  # -sig: editors on Windows start UTF-8 files with a BOM
        except UnicodeDecodeError:
            raise ForgetIdsError(f"{source} is not UTF-8 text; save the ids as {FORMS}") from None
    text = data.lstrip("\ufeff").strip()
    if text.startswith(("[", "{")):
        ids, dataset = _from_json(text, source)
    else:
        ids, dataset = _from_text(text, source), None
    if not ids:
        raise ForgetIdsError(f"{source} holds no ids; write {FORMS}")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ForgetIdsError(f"{source} lists id(s) {_few(repeated)} more than once; list each image once")
    return ForgetIdsFile(ids, dataset, source)


def parse_forget_ids(data: str | bytes, source: str = "the id list", dataset: str | None = None) -> list[int]:
    """The ids of a forget-id file's content; with `dataset`, a file naming another dataset is refused."""
    return parse_forget_ids_file(data, source).ids_for(dataset)


def read_forget_ids_file(path: str | Path) -> ForgetIdsFile:
    """Read and parse a forget-id file from disk."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ForgetIdsError(f"forget-id file {path} does not exist; check the path") from None
    except OSError as exc:
        raise ForgetIdsError(f"cannot read forget-id file {path}: {exc.strerror}") from None
    if not path.is_file():
        raise ForgetIdsError(f"forget-id file {path} is not a file; give the path of a .json or .txt id list")
    if size > MAX_BYTES:  # checked before reading: the wrong huge file should cost nothing
        raise ForgetIdsError(f"forget-id file {path} is {size:,} bytes, more than the {MAX_BYTES:,} an id list "
                             "may have; is it the right file?")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ForgetIdsError(f"cannot read forget-id file {path}: {exc.strerror}") from None
    return parse_forget_ids_file(data, str(path))


def read_forget_ids(path: str | Path, dataset: str | None = None) -> list[int]:
    """The ids in a forget-id file; with `dataset`, a file naming another dataset is refused."""
    return read_forget_ids_file(path).ids_for(dataset)


# ----------------------------------------------------------------------- helpers


def _from_json(text: str, source: str) -> tuple[list[int], str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ForgetIdsError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                             f"fix the syntax or write {FORMS}") from None
    dataset = None
    if isinstance(obj, dict):
        keys = [k for k in ("ids", "forget_ids") if k in obj]
        if len(keys) != 1:
            found = "both 'ids' and 'forget_ids'" if keys else f"keys {sorted(obj)[:6]}"
            raise ForgetIdsError(f"{source} is a JSON object with {found}; it needs exactly one of 'ids' or "
                                 f"'forget_ids' holding the list of ids")
        split = obj.get("split", "train")
        if split != "train":
            raise ForgetIdsError(f"{source} lists ids of the {split!r} split; only training images can be "
                                 f"forgotten, so give ids of the 'train' split")
        dataset = _dataset_name(obj.get("dataset"), source)
        obj = obj[keys[0]]
        where = f"'{keys[0]}' in {source}"
    else:
        where = source
    if not isinstance(obj, list):
        raise ForgetIdsError(f"{where} must be a JSON list of ids such as [3, 17, 42], not {type(obj).__name__}")
    for v in obj:
        if isinstance(v, bool) or not isinstance(v, int):
            hint = " (write whole numbers without a decimal point)" if isinstance(v, float) else ""
            raise ForgetIdsError(f"{where} holds {json.dumps(v)[:40]}, which is not a non-negative integer id"
                                 f"{hint}; ids are training-image numbers such as 3 or 17")
        if v < 0:
            raise ForgetIdsError(f"{where} holds {v}, which is not a non-negative integer id: ids start at 0")
    return list(obj), dataset


def _dataset_name(value: object, source: str) -> str | None:
    """The dataset a file names: a string, or (run.json) a dataset card with a name."""
    if isinstance(value, dict):
        value = value.get("name")
    if value is None or isinstance(value, str):
        return value or None
    raise ForgetIdsError(f"'dataset' in {source} must be a dataset name such as \"fashion-mnist\"; "
                         "fix it or remove the entry")


def _from_text(text: str, source: str) -> list[int]:
    ids: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in _TOKEN.split(line.split("#", 1)[0].strip()):
            if not token:
                continue
            if token.isascii() and token.isdigit():
                ids.append(int(token))
                continue
            if re.fullmatch(r"-\d+", token):
                raise ForgetIdsError(f"{source} line {lineno}: {token} is not a non-negative integer id: ids start "
                                     "at 0")
            raise ForgetIdsError(f"{source} line {lineno}: {token[:40]!r} is not a non-negative integer id; write "
                                 "one whole number per line (blank lines and # comments are fine), or a JSON list")
    return ids


def _few(values: list[int], n: int = 10) -> str:
    return ", ".join(map(str, values[:n])) + (f" and {len(values) - n} more" if len(values) > n else "")


__all__ = ["FORMS", "MAX_BYTES", "ForgetIdsError", "ForgetIdsFile", "parse_forget_ids", "parse_forget_ids_file",
           "read_forget_ids", "read_forget_ids_file"]

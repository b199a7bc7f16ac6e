"""Semantic anchors: per-class attribute descriptions and their frozen text embeddings (DESIGN §5).

A file `assets/anchors/<dataset>.json` holds
    {"dataset": "fashion-mnist", "classes": {"T-shirt/top": ["attribute", ...], ...}}
with the class names exactly as the dataset names them. For class c the attributes are
joined "a1; a2; ...; an" and encoded once; row c of the anchor matrix is that embedding.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import CIFAR10_CLASSES, FASHION_CLASSES
from .encoders import TextEncoder, get_encoder

ANCHOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "anchors"
JOINER = "; "
FORMAT_HINT = '{"dataset": "<name>", "classes": {"<class name>": ["<attribute>", ...], ...}}'

# CIFAR-100 fine label names in label order (the dataset's own meta file says the same).
CIFAR100_CLASSES = """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle
    bowl boy bridge bus butterfly camel can castle caterpillar cattle
    chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
    mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket
    rose sea seal shark shrew skunk skyscraper snail snake spider
    squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()
DATASET_CLASSES: dict[str, list[str]] = {
    "fashion-mnist": list(FASHION_CLASSES), "cifar10": list(CIFAR10_CLASSES), "cifar100": CIFAR100_CLASSES,
}


class AnchorError(ValueError):
    """Anchor descriptions are missing or malformed; the message says what is wrong and what to do."""


@dataclass
class AnchorSet:
    """Class names, their attribute texts, the encoder used, and the frozen C x e anchor matrix."""

    class_names: list[str]
    texts: dict[str, list[str]]
    encoder: str
    matrix: torch.Tensor  # float32 [C, e], unit rows, requires_grad False
    hash: str
    warnings: list[str] = field(default_factory=list)
    dataset: str = ""

    def to_dict(self) -> dict:
        """The anchor file format, classes in label order."""
        return {"dataset": self.dataset, "classes": {c: list(self.texts[c]) for c in self.class_names}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def joined(self) -> list[str]:
        """The exact strings that were encoded, one per class."""
        return [JOINER.join(self.texts[c]) for c in self.class_names]


# ------------------------------------------------------------------------ files


def default_anchor_path(dataset: str) -> Path:
    """assets/anchors/<dataset>.json (the file may not exist for a user's own dataset)."""
    name = str(dataset).strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise AnchorError(f"dataset name {dataset!r} cannot name an anchor file; use letters, digits, '.', '_', '-'")
    return ANCHOR_DIR / f"{name}.json"


def load_anchor_texts(path_or_dataset: str | Path, class_names: list[str]) -> dict[str, list[str]]:
    """Read and validate an anchor file, given its path or a dataset name with shipped anchors."""
    path, dataset = _resolve(path_or_dataset)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in ANCHOR_DIR.glob("*.json")))
        raise AnchorError(f"anchor file {path} not found. Write one in the form {FORMAT_HINT} with one list of "
                          f"visual attributes per class, or use a dataset with shipped anchors ({shipped}).")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise AnchorError(f"anchor file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise AnchorError(f"anchor file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}. Fix the syntax; the expected form is {FORMAT_HINT}.") from None
    except _DuplicateKey as exc:
        raise AnchorError(f"anchor file {path} names {exc.args[0]!r} twice; keep one entry per class.") from None
    if dataset and isinstance(obj, dict) and isinstance(obj.get("dataset"), str) and obj["dataset"] != dataset:
        raise AnchorError(f"anchor file {path} is for dataset {obj['dataset']!r}, not {dataset!r}")
    try:
        return validate_anchor_texts(obj, class_names)
    except AnchorError as exc:
        raise AnchorError(f"anchor file {path}: {exc}") from None


def _resolve(path_or_dataset: str | Path) -> tuple[Path, str]:
    """(file, dataset name if one was given instead of a path)."""
    if isinstance(path_or_dataset, Path):
        return path_or_dataset, ""
    text = str(path_or_dataset)
    bare_name = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) and not text.endswith(".json")
    if text.lower() in DATASET_CLASSES or (bare_name and not Path(text).exists()):
        return default_anchor_path(text), text.lower()
    return Path(text).expanduser(), ""


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


# ------------------------------------------------------------------------ validation


def validate_anchor_texts(obj: object, class_names: list[str]) -> dict[str, list[str]]:
    """Check an anchor object (file form, or a bare {class: [attributes]} mapping) against the class names.

    Returns {class: [stripped attributes]} in label order; raises AnchorError listing every problem.
    """
    classes = _classes_of(obj)
    problems: list[str] = []
    missing = [c for c in class_names if c not in classes]
    extra = [c for c in classes if c not in class_names]
    if missing:
        problems.append(f"missing classes: {', '.join(map(repr, missing))}" + _suggest(missing, extra))
    if extra:
        problems.append(f"extra classes not in the dataset: {', '.join(map(repr, extra))} "
                        f"(the dataset's classes are: {', '.join(class_names)})")
    out: dict[str, list[str]] = {}
    for c in class_names:
        if c in classes:
            attrs, errs = _check_attributes(c, classes[c])
            problems.extend(errs)
            out[c] = attrs
    if problems:
        raise AnchorError("invalid anchor descriptions: " + "; ".join(problems) + ". Give every class of the "
                          "dataset a non-empty list of non-empty attribute strings.")
    return out


def _classes_of(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise AnchorError(f"anchor data must be a JSON object of the form {FORMAT_HINT}, not {_type(obj)}")
    if "classes" in obj:
        if not isinstance(obj["classes"], dict):
            raise AnchorError(f"'classes' must be an object mapping class name to a list of attributes, "
                              f"not {_type(obj['classes'])}")
        if "dataset" in obj and not isinstance(obj["dataset"], str):
            raise AnchorError(f"'dataset' must be a string, not {_type(obj['dataset'])}")
        return obj["classes"]
    if "dataset" in obj:
        raise AnchorError(f"anchor data has no 'classes' entry; the expected form is {FORMAT_HINT}")
    return obj  # a bare {class: [attributes]} mapping, as the dashboard editor holds it


def _check_attributes(cls: str, value: object) -> tuple[list[str], list[str]]:
    if isinstance(value, str):
        return [], [f"class {cls!r} has a single string; make it a list of attributes, e.g. [{value[:40]!r}, ...]"]
    if not isinstance(value, list):
        return [], [f"class {cls!r} must map to a list of attribute strings, not {_type(value)}"]
    if not value:
        return [], [f"class {cls!r} has an empty attribute list"]
    errs, attrs = [], []
    for i, a in enumerate(value, 1):
        if not isinstance(a, str):
            errs.append(f"attribute {i} of class {cls!r} is {_type(a)}, not a string")
        elif not a.strip():
            errs.append(f"attribute {i} of class {cls!r} is an empty string")
        else:
            attrs.append(" ".join(a.split()))  # collapse whitespace so the hash ignores layout
    return attrs, errs


def _suggest(missing: list[str], extra: list[str]) -> str:
    """Point at likely misspellings: a missing class that closely matches an extra one."""
    pairs = [(m, hit[0]) for m in missing if (hit := difflib.get_close_matches(m, extra, n=1, cutoff=0.6))]
    return "".join(f" (is {e!r} meant to be {m!r}?)" for m, e in pairs)


def _type(x: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


# ------------------------------------------------------------------------ warnings


def anchor_warnings(texts: dict[str, list[str]], encoder: TextEncoder | None = None) -> list[str]:
    """Problems that do not stop a run but weaken the anchors; truncation is checked when an encoder is given."""
    out: list[str] = []
    texts = {c: v for c, v in texts.items() if isinstance(v, list)}  # wrong types are validation errors
    norm = {c: [_norm(a) for a in attrs if isinstance(a, str)] for c, attrs in texts.items()}
    for c, attrs in texts.items():
        empties = sum(1 for a in attrs if not isinstance(a, str) or not a.strip())
        if empties:
            out.append(f"{c}: {empties} empty attribute(s) will be ignored or rejected")
        dups = sorted({a for a in norm[c] if a and norm[c].count(a) > 1})
        if dups:
            out.append(f"{c}: repeated attribute(s) {', '.join(map(repr, dups))}; a repeat only adds weight")
    out.extend(_shared_attributes(norm))
    out.extend(_identical_classes(norm))
    if encoder is not None:
        for c, attrs in texts.items():
            joined = JOINER.join(a for a in attrs if isinstance(a, str) and a.strip())
            if encoder.truncated(joined):
                out.append(f"{c}: the description is longer than {encoder.name} reads; the tokenizer cuts it, so "
                           f"the last attributes do not reach the anchor. Shorten or drop attributes.")
    return out


def _norm(a: str) -> str:
    return " ".join(a.lower().split())


def _shared_attributes(norm: dict[str, list[str]]) -> list[str]:
    owners: dict[str, list[str]] = {}
    for c, attrs in norm.items():
        for a in dict.fromkeys(a for a in attrs if a):
            owners.setdefault(a, []).append(c)
    return [f"attribute {a!r} is shared by {', '.join(cs)}; that pulls their anchors together (fine for related "
            f"classes, but the differences are what separates them)" for a, cs in owners.items() if len(cs) > 1]


def _identical_classes(norm: dict[str, list[str]]) -> list[str]:
    seen: dict[tuple[str, ...], str] = {}
    out = []
    for c, attrs in norm.items():
        key = tuple(sorted(set(a for a in attrs if a)))
        if key and key in seen:
            out.append(f"{seen[key]} and {c} have identical descriptions, so their anchors are identical and "
                       f"cannot separate them; describe how they differ")
        seen.setdefault(key, c)
    return out


# ------------------------------------------------------------------------ building


def anchor_hash(class_names: list[str], texts: dict[str, list[str]], encoder: str) -> str:
    """sha256 of canonical JSON of the class names (in order), their texts and the encoder name."""
    canon = {"class_names": list(class_names), "texts": {c: list(texts[c]) for c in class_names}, "encoder": encoder}
    blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def build_anchor_set(texts: dict[str, list[str]], class_names: list[str], encoder: TextEncoder | str,
                     dataset: str = "") -> AnchorSet:
    """Validate the texts, encode one joined description per class, and freeze the matrix."""
    texts = validate_anchor_texts(texts, class_names)
    enc = get_encoder(encoder) if isinstance(encoder, str) else encoder
    vecs = enc.encode([JOINER.join(texts[c]) for c in class_names])
    if not np.isfinite(vecs).all():
        raise AnchorError(f"encoder {enc.name} produced non-finite embeddings; try another encoder")
    matrix = torch.from_numpy(np.array(vecs, dtype=np.float32))
    matrix = torch.nn.functional.normalize(matrix, dim=1).requires_grad_(False)  # unit rows in float32 exactly
    return AnchorSet(list(class_names), texts, enc.name, matrix, anchor_hash(class_names, texts, enc.name),
                     anchor_warnings(texts, enc), dataset)

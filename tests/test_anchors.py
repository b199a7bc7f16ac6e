"""Anchor files, validation errors, warnings, the frozen anchor matrix and its hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import anchors
from core.anchors import (
    CIFAR100_CLASSES,
    DATASET_CLASSES,
    AnchorError,
    anchor_hash,
    anchor_warnings,
    build_anchor_set,
    default_anchor_path,
    load_anchor_texts,
    validate_anchor_texts,
)
from core.data import CIFAR10_CLASSES, FASHION_CLASSES
from core.encoders import get_encoder

CLASSES = ["cat", "dog", "truck"]
TEXTS = {"cat": ["pointed ears", "whiskers"], "dog": ["floppy ears", "long snout"],
         "truck": ["big wheels", "cargo box"]}


@pytest.fixture(scope="module")
def rand_clip():
    return get_encoder("clip-random:ViT-S-32")  # the CLIP tokenizer and code path, no weights needed


@pytest.fixture(scope="module")
def minilm():
    return get_encoder("minilm")


def _write(tmp_path, obj, name="anchors.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def _load(tmp_path, obj):
    return load_anchor_texts(_write(tmp_path, obj), CLASSES)


# ------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("dataset", sorted(DATASET_CLASSES))
def test_shipped_anchor_files_validate(dataset, rand_clip):
    classes = DATASET_CLASSES[dataset]
    path = default_anchor_path(dataset)
    assert path.is_file()
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["dataset"] == dataset and list(raw["classes"]) == classes  # label order, exact names
    texts = load_anchor_texts(dataset, classes)
    assert texts == raw["classes"]  # nothing needed cleaning
    assert all(6 <= len(attrs) <= 10 for attrs in texts.values())
    assert anchor_warnings(texts, rand_clip) == []  # no duplicates, nothing the CLIP tokenizer cuts


def test_dataset_class_lists_match_the_data_module():
    assert DATASET_CLASSES["fashion-mnist"] == FASHION_CLASSES
    assert DATASET_CLASSES["cifar10"] == CIFAR10_CLASSES
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert CIFAR100_CLASSES[:5] == ["apple", "aquarium_fish", "baby", "bear", "beaver"]
    assert CIFAR100_CLASSES[-3:] == ["wolf", "woman", "worm"] and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


def test_fashion_anchors_encode_the_semantic_neighbourhoods(minilm):
    classes = FASHION_CLASSES
    aset = build_anchor_set(load_anchor_texts("fashion-mnist", classes), classes, minilm, dataset="fashion-mnist")
    sim = aset.matrix @ aset.matrix.T
    i = {c: k for k, c in enumerate(classes)}

    def s(a, b):
        return float(sim[i[a], i[b]])

    assert s("Sneaker", "Ankle boot") > s("Sneaker", "Trouser")
    assert s("Sandal", "Sneaker") > s("Sandal", "Dress")
    for top in ("T-shirt/top", "Pullover", "Coat"):
        assert s("Shirt", top) > s("Shirt", "Bag") and s("Shirt", top) > s("Shirt", "Sandal")


# ------------------------------------------------------------------- building, hash


def test_build_anchor_set(rand_clip):
    aset = build_anchor_set(TEXTS, CLASSES, rand_clip)
    assert aset.class_names == CLASSES and aset.encoder == rand_clip.name and aset.warnings == []
    m = aset.matrix
    assert m.shape == (3, rand_clip.dim) and m.dtype == torch.float32 and not m.requires_grad
    torch.testing.assert_close(m.norm(dim=1), torch.ones(3))
    expected = rand_clip.encode(["pointed ears; whiskers", "floppy ears; long snout", "big wheels; cargo box"])
    np.testing.assert_allclose(m.numpy(), expected, atol=1e-6)  # one joined description per class, in order
    assert len(aset.hash) == 64 and int(aset.hash, 16) >= 0
    assert aset.joined()[0] == "pointed ears; whiskers"


def test_build_accepts_an_encoder_name(rand_clip):
    aset = build_anchor_set(TEXTS, CLASSES, "clip-random:ViT-S-32")
    assert aset.encoder == rand_clip.name


def test_to_json_round_trips_through_a_file(rand_clip, tmp_path):
    aset = build_anchor_set(TEXTS, CLASSES, rand_clip, dataset="toy")
    obj = json.loads(aset.to_json())
    assert obj == {"dataset": "toy", "classes": TEXTS}
    path = _write(tmp_path, aset.to_json())
    assert load_anchor_texts(path, CLASSES) == TEXTS


def test_hash_follows_texts_encoder_and_class_order(rand_clip, minilm):
    base = build_anchor_set(TEXTS, CLASSES, rand_clip).hash
    assert build_anchor_set(json.loads(json.dumps(TEXTS)), CLASSES, rand_clip).hash == base  # deterministic
    edited = {**TEXTS, "dog": ["floppy ears", "long muzzle"]}
    assert build_anchor_set(edited, CLASSES, rand_clip).hash != base
    assert build_anchor_set(TEXTS, CLASSES, minilm).hash != base
    assert anchor_hash(["dog", "cat", "truck"], TEXTS, rand_clip.name) != base
    spaced = {**TEXTS, "cat": ["  pointed   ears ", "whiskers"]}  # layout is not content
    assert build_anchor_set(spaced, CLASSES, rand_clip).hash == base


def test_build_rejects_invalid_texts(rand_clip):
    with pytest.raises(AnchorError, match="missing classes: 'truck'"):
        build_anchor_set({"cat": ["a"], "dog": ["b"]}, CLASSES, rand_clip)


# ------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(AnchorError, match=r"nope\.json not found.*\"classes\".*fashion-mnist"):
        load_anchor_texts(tmp_path / "nope.json", CLASSES)
    with pytest.raises(AnchorError, match="my-own-data.json not found"):
        load_anchor_texts("my-own-data", CLASSES)  # a dataset without shipped anchors


def test_not_json(tmp_path):
    with pytest.raises(AnchorError, match="not valid JSON: .* line 1 column"):
        _load(tmp_path, '{"classes": {"cat": ["ears",]}')
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"classes": {"cat": ["caf\xe9"]}}'.encode("latin-1"))
    with pytest.raises(AnchorError, match="not UTF-8"):
        load_anchor_texts(bad, CLASSES)


def test_missing_class(tmp_path):
    with pytest.raises(AnchorError, match="missing classes: 'truck'") as info:
        _load(tmp_path, {"dataset": "toy", "classes": {"cat": ["a"], "dog": ["b"]}})
    assert "anchors.json" in str(info.value)  # the message names the file to fix


def test_extra_class(tmp_path):
    with pytest.raises(AnchorError, match="extra classes not in the dataset: 'horse'.*cat, dog, truck"):
        _load(tmp_path, {"classes": {**TEXTS, "horse": ["mane"]}})


def test_misspelled_class_gets_a_suggestion(tmp_path):
    texts = {"cat": ["a"], "dog": ["b"], "truk": ["c"]}
    with pytest.raises(AnchorError, match="is 'truk' meant to be 'truck'"):
        _load(tmp_path, {"classes": texts})


def test_empty_description_list(tmp_path):
    with pytest.raises(AnchorError, match="class 'dog' has an empty attribute list"):
        _load(tmp_path, {"classes": {**TEXTS, "dog": []}})


def test_empty_strings(tmp_path):
    with pytest.raises(AnchorError, match="attribute 2 of class 'cat' is an empty string"):
        _load(tmp_path, {"classes": {**TEXTS, "cat": ["ears", "   "]}})


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "must be a JSON object .* not a list"),
    ({"classes": ["cat", "dog"]}, "'classes' must be an object .* not a list"),
    ({"dataset": 3, "classes": TEXTS}, "'dataset' must be a string"),
    ({"dataset": "toy"}, "no 'classes' entry"),
    ({"classes": {**TEXTS, "cat": "pointed ears"}}, "class 'cat' has a single string; make it a list"),
    ({"classes": {**TEXTS, "cat": {"a": 1}}}, "class 'cat' must map to a list .* not an object"),
    ({"classes": {**TEXTS, "cat": ["ears", 3]}}, "attribute 2 of class 'cat' is a number, not a string"),
    ({"classes": {**TEXTS, "cat": ["ears", None]}}, "attribute 2 of class 'cat' is null"),
])
def test_wrong_types(tmp_path, obj, message):
    with pytest.raises(AnchorError, match=message):
        _load(tmp_path, obj)


def test_every_problem_is_reported_at_once():
    with pytest.raises(AnchorError) as info:
        validate_anchor_texts({"classes": {"cat": [], "dog": [""], "horse": ["x"]}}, CLASSES)
    msg = str(info.value)
    for part in ("missing classes: 'truck'", "extra classes", "'cat' has an empty attribute list",
                 "attribute 1 of class 'dog' is an empty string", "Give every class"):
        assert part in msg


def test_duplicate_class_key_in_the_file(tmp_path):
    raw = '{"classes": {"cat": ["a"], "dog": ["b"], "truck": ["c"], "cat": ["d"]}}'
    with pytest.raises(AnchorError, match="names 'cat' twice"):
        _load(tmp_path, raw)


def test_file_for_another_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(anchors, "ANCHOR_DIR", tmp_path)
    _write(tmp_path, {"dataset": "cifar10", "classes": TEXTS}, name="toy.json")
    with pytest.raises(AnchorError, match="is for dataset 'cifar10', not 'toy'"):
        load_anchor_texts("toy", CLASSES)


def test_validate_accepts_a_bare_mapping_and_cleans_whitespace():
    out = validate_anchor_texts({"truck": [" big  wheels "], "cat": ["ears"], "dog": ["snout"]}, CLASSES)
    assert list(out) == CLASSES and out["truck"] == ["big wheels"]


def test_default_anchor_path():
    assert default_anchor_path("Fashion-MNIST") == anchors.ANCHOR_DIR / "fashion-mnist.json"
    with pytest.raises(AnchorError, match="cannot name an anchor file"):
        default_anchor_path("../../etc/passwd")


# ------------------------------------------------------------------- warnings


def test_warnings_for_weak_descriptions(rand_clip):
    texts = {
        "cat": ["pointed ears", "Pointed  ears", "whiskers", ""],
        "dog": ["whiskers", "snout"],
        "truck": ["snout", "whiskers"],
    }
    w = anchor_warnings(texts)
    assert any(x.startswith("cat: 1 empty") for x in w)
    assert any(x.startswith("cat: repeated attribute(s) 'pointed ears'") for x in w)
    assert any("'whiskers' is shared by cat, dog, truck" in x for x in w)
    assert any(x.startswith("dog and truck have identical descriptions") for x in w)
    assert not any("longer than" in x for x in w)  # no encoder given: no truncation check


def test_truncation_warning(rand_clip):
    long = {**TEXTS, "truck": [f"attribute number {i} with several extra words" for i in range(12)]}
    w = anchor_warnings(long, rand_clip)
    assert len(w) == 1 and w[0].startswith("truck: the description is longer than clip-random:ViT-S-32")
    assert build_anchor_set(long, CLASSES, rand_clip).warnings == w
    assert anchor_warnings(TEXTS, rand_clip) == []


def test_anchor_warnings_tolerate_unvalidated_input():
    assert anchor_warnings({"cat": "not a list", "dog": ["a"]}) == []

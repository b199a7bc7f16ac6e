"""Anchors written by a language model, tested against a real OpenAI-compatible HTTP server.

`FakeLLM` is a small server (standard library http.server, in a thread, on 127.0.0.1) that answers
/v1/chat/completions like a hosted API or Ollama would, with a canned reply chosen by the model name:
numbered list, JSON, code fence, bullets, too few attributes, garbage, HTTP 429 then 200, 503 then 200,
HTTP 401, 404 model not found, a slow reply past the client's timeout. Nothing of our code is mocked: the
official openai client talks HTTP to it. The Anchors page's panel is tested in test_app_pages.py with it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.anchors import DATASET_CLASSES, load_anchor_texts
from core.anchors_llm import (
    JOINER,
    LLMConfig,
    LLMError,
    build_messages,
    clip_budget,
    dedupe,
    generate_anchors,
    parse_attributes,
    trim_to_budget,
)

ROOT = Path(__file__).resolve().parent.parent
FASHION = DATASET_CLASSES["fashion-mnist"]
ASPECTS = ["outline", "proportions", "parts and edges", "texture", "pattern", "position", "contrast", "size"]
LONG = [f"very long winding description number {i} of many small visual details at once" for i in range(12)]


def attrs_for(cls: str, n: int = 8) -> list[str]:
    """What the fake model says about a class: distinct per class, so the anchors differ."""
    return [f"{cls.lower()} {a}" for a in ASPECTS[:n]]


def numbered(items: list[str]) -> str:
    return "Here are useful features:\n\n" + "\n".join(f"{i}. **{a}**" for i, a in enumerate(items, 1)) + \
        "\n\nThese features together make the class easy to recognise."


class FakeLLM:
    """An OpenAI-compatible chat server on 127.0.0.1; the requested model name picks the reply.

    Replies: numbered, json, json-object, fence, bullets, few (3 attributes), long (12 long attributes),
    dupes, garbage (prose), notjson (an HTML page with status 200), flaky (429 then 200 per class),
    flaky5xx (503 then 200), always429, auth (401 echoing the Authorization header), slow (answers after
    `slow_s`); any other model: 404 model not found. A path other than /v1/chat/completions is a plain 404.
    With `key`, every request without "Authorization: Bearer <key>" gets 401 (echoing what it got).
    """

    def __init__(self, key: str | None = None, slow_s: float = 3.0) -> None:
        self.key, self.slow_s = key, slow_s
        self.requests: list[dict] = []
        self.failed: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                try:
                    server.answer(self, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------- replies

    def answer(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        auth = h.headers.get("Authorization", "")
        if h.path != "/v1/chat/completions":
            return self.send(h, 404, "404 page not found", "text/plain")
        model = body.get("model", "")
        if model == "auth" or (self.key and auth != f"Bearer {self.key}"):
            return self.send(h, 401, {"error": {"message": f"Incorrect API key provided: {auth}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}})
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        cls = re.search(r'"([^"]+)"', user).group(1)
        first = (model, cls) not in self.failed
        self.failed.add((model, cls))
        if model == "flaky" and first or model == "always429":
            return self.send(h, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}},
                             headers={"retry-after-ms": "20"})
        if model == "flaky5xx" and first:
            return self.send(h, 503, {"error": {"message": "model is loading"}})
        if model == "slow":
            time.sleep(self.slow_s)
        items = attrs_for(cls)
        replies = {
            "numbered": numbered(items), "slow": numbered(items), "flaky": numbered(items),
            "flaky5xx": numbered(items),
            "json": json.dumps(items),
            "json-object": json.dumps({"class": cls, "attributes": items}),
            "fence": "Sure! Here they are:\n```json\n" + json.dumps(items, indent=2) + "\n```\nHope this helps.",
            "bullets": "## Features\n" + "\n".join(f"- {a.capitalize()}." for a in items),
            "few": numbered(items[:3]),
            "long": numbered(LONG),
            "dupes": numbered([items[0], items[0].upper(), items[1] + ".", items[1], items[2]]),
            "garbage": "I am sorry, but I cannot help with describing pictures of that kind, because I was not "
                       "given enough information about the request.",
        }
        if model == "notjson":
            return self.send(h, 200, "<html><body>Welcome to nginx!</body></html>", "text/html")
        if model not in replies:
            return self.send(h, 404, {"error": {"message": f"model '{model}' not found", "type": "not_found_error",
                                                "code": "model_not_found"}})
        self.send(h, 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                           "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                               "role": "assistant", "content": replies[model]}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, payload, ctype: str = "application/json",
             headers: dict | None = None) -> None:
        data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


@pytest.fixture
def clean_llm_env(monkeypatch):
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "STRUCTGUARD_LLM_MODEL"):
        monkeypatch.delenv(k, raising=False)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize("reply", [
    "1. long sleeves\n2. ribbed cuffs\n3. round neckline",
    "Here you go:\n1) long sleeves\n2) ribbed cuffs\n3) round neckline\nLet me know!",
    '["long sleeves", "ribbed cuffs", "round neckline"]',
    '{"Pullover": ["long sleeves", "ribbed cuffs", "round neckline"]}',
    '{"attributes": [{"attribute": "long sleeves"}, {"attribute": "ribbed cuffs"}, {"attribute": "round neckline"}]}',
    'Sure:\n```json\n["long sleeves", "ribbed cuffs", "round neckline"]\n```',
    "```\n- long sleeves\n- ribbed cuffs\n- round neckline\n```",
    "### Visual features\n* **Long sleeves**.\n* Ribbed cuffs,\n• 'round neckline'",
    "<think>The user wants a list. Pullovers have sleeves.</think>\nlong sleeves\nribbed cuffs\nround neckline",
    "long sleeves; ribbed cuffs; round neckline",
    '[\n  "long sleeves",\n  "ribbed cuffs",\n  "round neckline",\n',  # a cut-off JSON list: read line by line
])
def test_parser_reads_every_shape(reply: str) -> None:
    got = [a.lower() for a in parse_attributes(reply, "Pullover")]
    assert got == ["long sleeves", "ribbed cuffs", "round neckline"], reply


@pytest.mark.parametrize("reply", [
    "", "   ", "{}", "[]", "[1, 2, 3]", "%%%\n@@@\n###",
    "I am sorry, but I cannot help with describing pictures of that kind, because I was not given enough detail.",
    "Error: upstream model failed",  # one unmarked line is a sentence, not a list
    "<html><body>Bad gateway</body></html>",
])
def test_parser_finds_nothing_in_garbage(reply: str) -> None:
    assert parse_attributes(reply) == []


def test_parser_dedupes_and_drops_prose() -> None:
    reply = ("1. Long sleeves\n2. long sleeves.\n3. LONG SLEEVES\n4. ribbed cuffs\n"
             "5. this line is far too long to be one attribute because it goes on and on about many things at once")
    assert parse_attributes(reply) == ["Long sleeves", "ribbed cuffs"]
    assert dedupe(["a b", "A, b", "c"]) == ["a b", "c"]


def test_trim_to_budget_keeps_the_longest_prefix() -> None:
    fits = clip_budget()
    kept, dropped = trim_to_budget(LONG, fits)
    assert 1 <= len(kept) < len(LONG) and kept + dropped == LONG
    assert fits(JOINER.join(kept)) and not fits(JOINER.join(LONG[:len(kept) + 1]))
    assert trim_to_budget(["x " * 200], fits) == (["x " * 200], [])  # the first attribute always stays


def test_prompt_sends_class_names_only() -> None:
    msgs = build_messages("Shirt", FASHION, "fashion-mnist", 6)
    user = msgs[-1]["content"]
    assert '"Shirt"' in user and "T-shirt/top" in user and "Ankle boot" in user and "Give 6" in user
    assert "grayscale" in user  # what Fashion-MNIST images look like
    assert "aquarium fish" in build_messages("aquarium_fish", DATASET_CLASSES["cifar100"], "cifar100")[-1]["content"]


# ---------------------------------------------------------------- configuration


def test_config_from_env_and_flags(clean_llm_env, monkeypatch) -> None:
    with pytest.raises(LLMError, match="no language-model endpoint configured.*OPENAI_BASE_URL"):
        LLMConfig.from_env()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:pw@localhost:11434/v1/?key=abc")
    with pytest.raises(LLMError, match="no model named for http://localhost:11434/v1/: set STRUCTGUARD_LLM_MODEL"):
        LLMConfig.from_env()
    monkeypatch.setenv("STRUCTGUARD_LLM_MODEL", "llama3.2")
    cfg = LLMConfig.from_env()
    assert cfg.host == "localhost:11434" and cfg.model == "llama3.2" and cfg.api_key is None
    assert LLMConfig.from_env(base_url="http://h:1/v1", model="m").describe() == {
        "model": "m", "endpoint": "h:1", "prompt_version": "1"}
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    cfg = LLMConfig.from_env()
    assert cfg.base_url == "https://api.openai.com/v1" and "sk-secret" not in repr(cfg) + str(cfg.describe())
    with pytest.raises(LLMError, match="not an http"):
        LLMConfig.from_env(base_url="localhost:11434")


# ---------------------------------------------------------------- against the server


def cfg(server: FakeLLM, model: str, **kw) -> LLMConfig:
    return LLMConfig(server.url, model, kw.pop("api_key", None), **{"timeout": 30, "backoff": 0.01, **kw})


@pytest.mark.parametrize("model", ["numbered", "json", "json-object", "fence", "bullets"])
def test_generate_reads_each_reply_shape(llm: FakeLLM, model: str) -> None:
    seen = []
    out = generate_anchors(FASHION, cfg(llm, model), dataset="fashion-mnist", on_class=lambda c, a: seen.append(c))
    assert list(out.texts) == FASHION and sorted(seen) == sorted(FASHION)
    assert [a.lower() for a in out.texts["Trouser"]] == attrs_for("Trouser")
    assert out.notes == {}
    assert out.meta["model"] == model and out.meta["endpoint"] == f"127.0.0.1:{llm.httpd.server_port}"
    assert out.meta["prompt_version"] == "1" and out.meta["time"].endswith("+00:00")
    assert len(llm.requests) == 10
    sent = json.dumps([r["body"] for r in llm.requests])
    assert "image_url" not in sent and "base64" not in sent  # class names only, never images


def test_generate_notes_too_few_duplicates_and_budget(llm: FakeLLM) -> None:
    few = generate_anchors(FASHION, cfg(llm, "few"), only=["Bag"])
    assert few.texts == {"Bag": attrs_for("Bag", 3)}
    assert few.notes["Bag"] == ["the model gave 3 of the 8 attributes asked for"]
    dup = generate_anchors(FASHION, cfg(llm, "dupes"), only=["Coat"])
    assert dup.texts["Coat"] == attrs_for("Coat", 3)
    long = generate_anchors(FASHION, cfg(llm, "long"), only=["Coat"], n_attributes=10)
    assert 1 <= len(long.texts["Coat"]) < 10 and "dropped to fit CLIP's 77-token limit" in long.notes["Coat"][0]
    assert clip_budget()(JOINER.join(long.texts["Coat"]))


def test_generate_retries_429_and_5xx(llm: FakeLLM) -> None:
    out = generate_anchors(FASHION, cfg(llm, "flaky"), only=["Dress", "Shirt"])
    assert out.texts["Dress"] == attrs_for("Dress") and len(llm.requests) == 4
    out = generate_anchors(FASHION, cfg(llm, "flaky5xx"), only=["Dress"])
    assert out.texts["Dress"] == attrs_for("Dress")
    with pytest.raises(LLMError, match=r"still rate-limits after 2 retries \(HTTP 429\)"):
        generate_anchors(FASHION, cfg(llm, "always429", retries=2), only=["Dress"])


def test_generate_errors_are_one_clear_line(llm: FakeLLM) -> None:
    cases = {
        "garbage": r"could not read attributes for 'Dress' from the reply of garbage .*it began: 'I am sorry",
        "notjson": r"not a chat completion: '<html><body>Welcome to nginx",
        "no-such-model": r"model 'no-such-model' not found at 127\.0\.0\.1:\d+; name one the server has",
        "auth": r"refused the request with HTTP 401 \(authentication\).*set OPENAI_API_KEY",
        "slow": r"no reply from 127\.0\.0\.1:\d+ within 1 s",
    }
    for model, pattern in cases.items():
        with pytest.raises(LLMError, match=pattern) as err:  # the server sleeps 3 s before a "slow" reply
            generate_anchors(FASHION, cfg(llm, model, timeout=1 if model == "slow" else 10), only=["Dress"])
        assert "\n" not in str(err.value)
    garbage = str(pytest.raises(LLMError, generate_anchors, FASHION, cfg(llm, "garbage"), only=["Dress"]).value)
    assert len(garbage.split("it began: ")[1]) <= 202  # the first 200 characters, quoted
    refused = LLMConfig(f"http://127.0.0.1:{free_port()}/v1", "numbered", timeout=10)
    with pytest.raises(LLMError, match=r"cannot connect to http://127\.0\.0\.1:\d+/v1: connection refused"):
        generate_anchors(FASHION, refused, only=["Dress"])
    no_v1 = LLMConfig(llm.url.removesuffix("/v1"), "numbered", timeout=10)
    with pytest.raises(LLMError, match=r"chat/completions not found .*ends in /v1"):
        generate_anchors(FASHION, no_v1, only=["Dress"])


def test_the_key_is_sent_but_never_shown() -> None:
    key = "sk-test-DO-NOT-SHOW-0123456789"
    with FakeLLM(key=key) as server:
        out = generate_anchors(FASHION, cfg(server, "numbered", api_key=key), only=["Sandal"])
        assert server.requests[-1]["headers"]["authorization"] == f"Bearer {key}"
        assert key not in out.to_json() and key not in repr(out)
        with pytest.raises(LLMError) as err:  # the server echoes the wrong key it got; the message hides it
            generate_anchors(FASHION, cfg(server, "numbered", api_key=key + "-wrong"), only=["Sandal"])
        assert "HTTP 401" in str(err.value) and key not in str(err.value) and "***" in str(err.value)


def test_generated_file_loads_as_anchors(llm: FakeLLM, tmp_path: Path) -> None:
    out = generate_anchors(FASHION, cfg(llm, "json"), dataset="fashion-mnist")
    path = out.write(tmp_path / "sub" / "a.json")
    assert load_anchor_texts(path, FASHION) == out.texts
    assert json.loads(path.read_text())["generated"]["attributes_requested"] == 8


# ---------------------------------------------------------------- command line


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY",
                                                            "STRUCTGUARD_LLM_MODEL")}
    full.update(HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "core", "anchors", "generate", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cli_generates_a_file_end_to_end(llm: FakeLLM, tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    key = "sk-cli-secret-987654321"
    with FakeLLM(key=key) as server:
        proc = run_cli("--dataset", "fashion-mnist", "--out", str(out), "--attributes", "6",
                       env={"OPENAI_BASE_URL": server.url, "STRUCTGUARD_LLM_MODEL": "fence", "OPENAI_API_KEY": key})
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "10 classes" in proc.stdout and "Ankle boot" in proc.stdout
    data = json.loads(out.read_text())
    assert data["dataset"] == "fashion-mnist" and data["classes"]["Bag"] == attrs_for("Bag", 6)
    assert data["generated"]["model"] == "fence" and data["generated"]["endpoint"].startswith("127.0.0.1:")
    assert key not in out.read_text() + proc.stdout + proc.stderr
    assert load_anchor_texts(out, FASHION) == data["classes"]

    folder = tmp_path / "pets"
    for c in ("cat", "dog", "fish"):
        (folder / "train" / c).mkdir(parents=True)
    proc = run_cli("--folder", str(folder), "--out", str(tmp_path / "pets.json"), "--base-url", llm.url,
                   "--model", "few")
    assert proc.returncode == 0, proc.stderr
    assert "3 of the 8 attributes asked for" in proc.stdout
    assert json.loads((tmp_path / "pets.json").read_text())["dataset"] == "pets"


def test_cli_errors_exit_2_with_one_line(llm: FakeLLM, tmp_path: Path) -> None:
    proc = run_cli("--classes", "cat,dog", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: no language-model endpoint configured")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(("model", "extra", "expected"), [
    ("auth", [], "HTTP 401 (authentication)"),
    ("no-such-model", [], "model 'no-such-model' not found"),
    ("garbage", [], "could not read attributes for '"),  # 'cat' or 'dog': whichever answers first
    ("slow", ["--timeout", "1"], "no reply from 127.0.0.1"),
    ("always429", ["--retries", "1"], "still rate-limits after 1 retries"),
    ("refused", [], "connection refused"),
])
def test_cli_error_kinds(llm: FakeLLM, tmp_path: Path, capsys, clean_llm_env, model, extra, expected) -> None:
    from core.cli import main

    url = f"http://127.0.0.1:{free_port()}/v1" if model == "refused" else llm.url
    code = main(["anchors", "generate", "--classes", "cat,dog", "--out", str(tmp_path / "x.json"),
                 "--base-url", url, "--model", model, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()

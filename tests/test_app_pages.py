"""Streamlit AppTest of every dashboard page and its main interactions.

Runs come from the real engine with a tiny budget (`TINY`: one PGD step, two proxies per
image, one pass) on the bundled 3,000/1,000 subset, so the pages are tested against real
run directories; `GatedEngine` only controls when a run proceeds (to see it running, and
to cancel it through the engine's own cancel path).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fashion_idx
from streamlit.testing.v1 import AppTest
from test_anchors_llm import FakeLLM, attrs_for

from core import pipeline, runs
from core.data import load_dataset
from core.models import SAMPLE_MODELS, create_model, save_model

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TIMEOUT = 120


# ---------------------------------------------------------------- fixtures


def write_subset_idx(root: Path) -> Path:
    """The bundled subset (3,000 train / 1,000 test) as IDX files: a small, fast dataset for the pages."""
    return write_fashion_idx(root)


@pytest.fixture(scope="module")
def app_env(tmp_path_factory: pytest.TempPathFactory):
    """Runs in a temp folder, the sample model (or a random stand-in), a fast encoder, PCA drift."""
    tmp = tmp_path_factory.mktemp("app")
    data_dir = write_subset_idx(tmp / "fashion")
    if (SAMPLE_MODELS / "fmnist_resnet18_narrow.json").is_file():
        model = "fmnist_resnet18_narrow"
    else:
        torch.manual_seed(0)
        card = {"arch": "resnet18_narrow", "dataset": "fashion-mnist", "input_shape": [1, 28, 28],
                "class_names": load_dataset("fashion-mnist", data_dir).class_names, "test_acc": 10.0}
        save_model(create_model("resnet18_narrow", 10, 1), tmp / "stand_in", card)
        model = str(tmp / "stand_in")
    env = {"STRUCTGUARD_FASHION_DIR": str(data_dir), "STRUCTGUARD_RUNS": str(tmp / "runs"),
           "STRUCTGUARD_MODEL": model, "HF_HUB_OFFLINE": "1",
           "STRUCTGUARD_ENCODER": "clip-random:ViT-S-32", "STRUCTGUARD_DRIFT_METHOD": "pca"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The real engine with a tiny budget (1 PGD step, 2 proxies per image, 1 pass), so a run takes seconds.
TINY = {"pgd_iters": 1, "n_adv": 2, "max_epochs": 1}
REAL_EXECUTE_RUN = pipeline.execute_run


def make_real_run(root: Path, model: str, method: str, forget_ids: list[int], parent: str | None = None,
                  seed: int = 0, config: dict | None = None) -> Path:
    """A complete run directory written by the real engine (tiny budget, small evaluation sets)."""
    request = pipeline.RunRequest(forget_ids=forget_ids, method=method, model=model, seed=seed,
                                  config=dict(TINY, **(config or {})),
                                  parent_run=str(root / parent) if parent else None,
                                  data_dir=os.environ["STRUCTGUARD_FASHION_DIR"],
                                  encoder=os.environ["STRUCTGUARD_ENCODER"], runs_root=str(root),
                                  retain_eval=200, audit_per_class=3)
    return REAL_EXECUTE_RUN(request)


class GatedEngine:
    """The real core.pipeline.execute_run (tiny budget) with test control over its timing.

    `gate` holds the run at its first progress report until the test sets it; `block`
    keeps it there until the page's Cancel reaches should_cancel, so the engine's own
    cancel path raises.
    """

    def __init__(self, block: bool = False) -> None:
        self.block, self.requests = block, []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, request: pipeline.RunRequest, callbacks) -> Path:
        self.requests.append(request)
        small = dataclasses.replace(request, config={**request.config, **TINY}, retain_eval=200, audit_per_class=3)
        outer = callbacks.on_progress
        held = [False]

        def on_progress(fraction: float, message: str) -> None:
            if not held[0]:
                held[0] = True
                while self.block and not callbacks.should_cancel():
                    time.sleep(0.05)
                self.gate.wait(30)
            if outer:
                outer(fraction, message)

        callbacks.on_progress = on_progress
        return REAL_EXECUTE_RUN(small, callbacks)


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def use_fake_engine(monkeypatch, fake) -> None:
    """Replace the engine by an in-process fake: jobs then run in a server thread (dashboard.worker.IN_PROCESS),
    where the fake is seen; the worker-process path is tested with the real engine (test_worker.py)."""
    from dashboard import worker

    monkeypatch.setattr(pipeline, "execute_run", fake)
    monkeypatch.setattr(worker, "IN_PROCESS", False)


def wait_for_job(at: AppTest, limit: float = 240) -> None:
    """Re-run the script (as the fragment would) until this session's job is no longer running."""
    from dashboard import jobs

    end = time.time() + limit
    while time.time() < end:
        job = jobs.registry().get(at.session_state.token)
        if job is not None and job.status != "running":
            job.thread.join(5)
            at.run()
            return
        time.sleep(0.2)
    raise AssertionError("the background job did not finish")


CACHED = ("get_dataset", "get_model", "get_encoder", "encoder_choices", "class_positions", "train_predictions",
          "thumbnail", "load_run", "drift_view", "affinity_view", "gradcam_view", "warm_up_drift")


def record_cached_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(function, thread name) of every call to dashboard.resources' Streamlit-cached getters from now on."""
    from dashboard import resources

    calls: list[tuple[str, str]] = []

    def recording(name: str, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, threading.current_thread().name))
            return fn(*args, **kwargs)
        return wrapper

    for name in CACHED:
        monkeypatch.setattr(resources, name, recording(name, getattr(resources, name)))
    return calls


def png_bytes(size: tuple[int, int] = (28, 28), mode: str = "L", noise: bool = False) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if noise:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8)).save(buf, format="PNG")
    else:
        Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- Start


def test_start_page_shows_model_dataset_encoder_device(app_env) -> None:
    at = new_app()
    no_exceptions(at)
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "Model" in text and "Dataset" in text and "Device" in text
    assert "fashion-mnist" in text and "Source" in text
    assert "clip-random:ViT-S-32" in text  # the encoder in use is named
    assert any(b.label == "Run the teaching demo" for b in at.button)
    assert at.session_state.token and at.query_params["s"] in (at.session_state.token, [at.session_state.token])


def test_teaching_demo_runs_both_methods_and_opens_comparison(app_env, monkeypatch) -> None:
    fake = GatedEngine()
    use_fake_engine(monkeypatch, fake)
    calls = record_cached_calls(monkeypatch)
    at = new_app()
    next(b for b in at.button if b.label == "Run the teaching demo").click().run()
    no_exceptions(at)
    wait_for_job(at)
    no_exceptions(at)
    assert calls and not [c for c in calls if c[1].startswith("structguard-")], "the worker thread used st caches"
    for run_id in at.session_state.compare_runs:  # the worker prepared the drift map beside each run (core only)
        assert list((Path(app_env["STRUCTGUARD_RUNS"]) / run_id / "views").glob("drift-*.npz"))
    assert [r.method for r in fake.requests] == ["neggrad", "structguard"]
    assert fake.requests[0].forget_ids == fake.requests[1].forget_ids
    assert at.title[0].value == "Runs"
    assert len(at.session_state.compare_runs) == 2
    assert any("Comparison of 2 runs" in s.value for s in at.subheader)


# ---------------------------------------------------------------- Forget set


def test_forget_set_click_select_random_and_filter(app_env) -> None:
    at = new_app()
    at.switch_page("app_pages/forget_set.py").run()
    no_exceptions(at)
    assert len(at.image) >= 24  # a page of enlarged thumbnails
    first = next(b for b in at.button if b.key and b.key.startswith("tg_"))
    sid = int(first.key[3:])
    first.click().run()
    assert at.session_state.selection == {sid}
    assert at.button(key=f"tg_{sid}").label == "✓ selected"
    at.button(key=f"tg_{sid}").click().run()
    assert at.session_state.selection == set()

    at.selectbox(key="fs_class").set_value(3).run()
    assert all(b.key[3:].isdigit() for b in at.button if b.key and b.key.startswith("tg_"))
    at.radio(key="fs_mode").set_value("per class").run()
    at.number_input(key="fs_k").set_value(2).run()
    next(b for b in at.button if b.label == "Draw random images").click().run()
    no_exceptions(at)
    assert len(at.session_state.selection) == 20  # 2 per class x 10 classes

    at.selectbox(key="fs_filter").set_value("misclassified").run()
    no_exceptions(at)
    assert any("images match" in c.value for c in at.caption)


def test_forget_set_uploads_are_validated(app_env) -> None:
    at = new_app()
    at.switch_page("app_pages/forget_set.py").run()
    uploader = at.file_uploader[0]
    bomb = png_bytes((3000, 2000))
    files = [("good.png", png_bytes(), "image/png"), ("text.png", b"not an image at all", "image/png"),
             ("broken.png", png_bytes((64, 64), noise=True)[:2000], "image/png"), ("huge.png", bomb, "image/png")]
    uploader.set_value(files).run()
    next(b for b in at.button if b.label == "Add uploaded images").click().run()
    no_exceptions(at)
    errors = " ".join(e.value for e in at.error)
    assert "text.png: is not an image" in errors
    assert "broken.png: is a damaged or truncated image" in errors
    assert "huge.png" in errors and "decompression bomb" in errors
    assert len(at.session_state.uploads) == 1 and at.session_state.uploads[0].pixels.shape == (1, 28, 28)

    at.radio(key="fs_up_mode").set_value("from file name (<class>_anything.png)").run()
    at.file_uploader[0].set_value([("Robot_1.png", png_bytes(), "image/png"),
                                   ("sneaker_2.png", png_bytes(), "image/png")]).run()
    next(b for b in at.button if b.label == "Add uploaded images").click().run()
    assert any("Robot_1.png: label 'Robot' is not one of the classes" in e.value for e in at.error)
    assert [u.label for u in at.session_state.uploads] == [0, 7]  # first class (the default), then "sneaker"

    at.file_uploader[0].set_value([(f"{i}_x.png", png_bytes(), "image/png") for i in range(40)]).run()
    next(b for b in at.button if b.label == "Add uploaded images").click().run()
    assert any("Too many files" in e.value for e in at.error)
    assert len(at.session_state.uploads) == 2


def test_forget_set_save_and_load_id_lists(app_env) -> None:
    at = new_app()
    at.switch_page("app_pages/forget_set.py").run()
    at.session_state.selection = {5, 7, 11}
    at.run()
    dl = at.download_button[0]
    assert not dl.proto.disabled
    at.file_uploader[1].set_value(("ids.txt", b"1\n2\n3 # comment\n", "text/plain")).run()
    next(b for b in at.button if b.label == "Load this id list").click().run()
    assert at.session_state.selection == {1, 2, 3}
    at.file_uploader[1].set_value(("bad.json", b'{"ids": [1, -4]}', "application/json")).run()
    next(b for b in at.button if b.label == "Load this id list").click().run()
    assert any("is not a non-negative integer id" in e.value for e in at.error)
    at.file_uploader[1].set_value(("far.json", b'{"ids": [99999999]}', "application/json")).run()
    next(b for b in at.button if b.label == "Load this id list").click().run()
    assert any("not in this split" in e.value for e in at.error)
    assert at.session_state.selection == {1, 2, 3}


# ---------------------------------------------------------------- Anchors


def test_anchors_edit_warn_restore_import(app_env) -> None:
    at = new_app()
    at.switch_page("app_pages/anchors.py").run()
    no_exceptions(at)
    assert len(at.text_area) == 10
    assert at.get("plotly_chart"), "anchor-similarity heatmap"
    assert any("Encoder in use" in c.value for c in at.caption)
    at.text_area[0].input("cotton\nshort sleeves\nshort sleeves").run()
    no_exceptions(at)
    assert at.session_state.anchor_texts["T-shirt/top"] == ["cotton", "short sleeves", "short sleeves"]
    assert any("repeated attribute" in w.value for w in at.warning)
    assert at.dataframe, "difference from the defaults"
    at.text_area[1].input("").run()
    assert any("empty attribute list" in e.value for e in at.error)
    next(b for b in at.button if b.label == "Restore defaults").click().run()
    no_exceptions(at)
    assert not any("repeated attribute" in w.value for w in at.warning)

    bad = json.dumps({"dataset": "fashion-mnist", "classes": {"T-shirt": ["x"]}}).encode()
    at.file_uploader[0].set_value(("a.json", bad, "application/json")).run()
    next(b for b in at.button if b.label == "Use this file").click().run()
    assert any("does not fit fashion-mnist" in e.value and "missing classes" in e.value for e in at.error)
    other = json.dumps({"dataset": "cifar10", "classes": {}}).encode()
    at.file_uploader[0].set_value(("b.json", other, "application/json")).run()
    next(b for b in at.button if b.label == "Use this file").click().run()
    assert any("for dataset 'cifar10'" in e.value for e in at.error)
    good = {c: [f"{c} attribute"] for c in at.session_state.anchor_texts}
    at.file_uploader[0].set_value(("c.json", json.dumps({"classes": good}).encode(), "application/json")).run()
    next(b for b in at.button if b.label == "Use this file").click().run()
    no_exceptions(at)
    assert at.session_state.anchor_texts == good


def test_anchors_import_error_names_the_upload_not_a_temp_path(app_env) -> None:
    at = new_app()
    at.switch_page("app_pages/anchors.py").run()
    bad = json.dumps({"dataset": "fashion-mnist", "classes": {"T-shirt": ["x"]}}).encode()
    at.file_uploader[0].set_value(("my anchors.json", bad, "application/json")).run()
    next(b for b in at.button if b.label == "Use this file").click().run()
    errors = [e.value for e in at.error]
    assert any(e.startswith("my anchors.json does not fit fashion-mnist: invalid anchor descriptions") for e in errors)
    assert not any("/tmp" in e or "anchors.json:" in e.replace("my anchors.json", "") for e in errors), errors


# ---------------------------------------------------------------- Anchors: language model


@pytest.fixture
def llm_server(app_env, monkeypatch):
    """The OpenAI-compatible test server of test_anchors_llm, named by the environment as a user would."""
    with FakeLLM() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("STRUCTGUARD_LLM_MODEL", "numbered")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield server


def test_anchors_llm_panel_without_endpoint_says_how(app_env, monkeypatch) -> None:
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "STRUCTGUARD_LLM_MODEL"):
        monkeypatch.delenv(k, raising=False)
    at = new_app()
    at.switch_page("app_pages/anchors.py").run()
    no_exceptions(at)
    assert any("No language-model endpoint is configured" in i.value and "OPENAI_BASE_URL" in i.value
               and "STRUCTGUARD_LLM_MODEL" in i.value for i in at.info)
    assert at.button(key="llm_all").disabled and at.button(key="llm_one_0").disabled
    assert len(at.text_area) == 10 and at.get("plotly_chart")  # the rest of the page works as today
    at.text_area[0].input("cotton\nshort sleeves").run()
    assert at.session_state.anchor_texts["T-shirt/top"] == ["cotton", "short sleeves"]


def test_anchors_llm_panel_generate_diff_accept_discard(app_env, llm_server) -> None:
    at = new_app()
    at.switch_page("app_pages/anchors.py").run()
    no_exceptions(at)
    assert not at.info, [i.value for i in at.info]
    assert at.text_input(key="llm_base_url").value == llm_server.url
    assert at.text_input(key="llm_model").value == "numbered"
    defaults = {c: list(v) for c, v in at.session_state.anchor_texts.items()}

    # one class: a diff against the current texts, nothing changed yet
    at.button(key="llm_one_1").click().run()
    no_exceptions(at)
    assert list(at.session_state.llm_pending["texts"]) == ["Trouser"]
    shown = " ".join(m.value for m in at.markdown)
    assert ":green-badge[new] trouser outline" in shown and ":red-badge[dropped] ~~two long separate legs~~" in shown
    assert at.session_state.anchor_texts == defaults
    assert '"Trouser"' in llm_server.requests[-1]["body"]["messages"][-1]["content"]

    # accept this class: it becomes an ordinary, editable anchor and the heatmap is re-encoded
    at.button(key="llm_acc_1").click().run()
    no_exceptions(at)
    assert at.session_state.anchor_texts["Trouser"] == attrs_for("Trouser")
    assert at.session_state.anchor_texts["T-shirt/top"] == defaults["T-shirt/top"]
    assert "llm_pending" not in at.session_state
    editor = at.text_area(key=f"anc_{at.session_state.anchor_rev}_1")  # Trouser's editor, re-read
    assert editor.value == "\n".join(attrs_for("Trouser")) and editor.label == "Trouser (edited)"
    assert at.session_state.anchor_set.texts["Trouser"] == attrs_for("Trouser")
    assert any("Accepted the model's attributes for Trouser" in m.value for m in at.success)

    # all classes, then discard: nothing changes
    at.button(key="llm_all").click().run()
    no_exceptions(at)
    assert list(at.session_state.llm_pending["texts"]) == list(defaults)
    assert any("same as now" in m.value for m in at.markdown)  # Trouser already holds these
    at.button(key="llm_discard").click().run()
    assert "llm_pending" not in at.session_state
    assert at.session_state.anchor_texts["Coat"] == defaults["Coat"]

    # all classes in another reply shape, then accept all
    at.text_input(key="llm_model").set_value("fence").run()
    at.button(key="llm_all").click().run()
    at.button(key="llm_accept").click().run()
    no_exceptions(at)
    assert at.session_state.anchor_texts == {c: attrs_for(c) for c in defaults}
    assert at.session_state.anchor_set.texts == at.session_state.anchor_texts

    # errors are one line in the panel; the page keeps working
    at.text_input(key="llm_model").set_value("no-such-model").run()
    at.button(key="llm_one_0").click().run()
    no_exceptions(at)
    assert any("model 'no-such-model' not found" in e.value for e in at.error)
    at.text_input(key="llm_model").set_value("garbage").run()
    at.button(key="llm_one_0").click().run()
    assert any("could not read attributes for 'T-shirt/top'" in e.value and "I am sorry" in e.value for e in at.error)
    assert "llm_pending" not in at.session_state and at.get("plotly_chart")


# ---------------------------------------------------------------- Unlearn


def test_unlearn_controls_start_and_open_audit(app_env, monkeypatch) -> None:
    fake = GatedEngine()
    fake.gate.clear()
    use_fake_engine(monkeypatch, fake)
    at = new_app()
    at.switch_page("app_pages/unlearn.py").run()
    no_exceptions(at)
    start = next(b for b in at.button if b.label == "Start unlearning")
    assert start.disabled and any("forget set is empty" in w.value for w in at.warning)
    at.session_state.selection = {0, 1, 2, 3}
    at.run()
    assert {t.label.split(":")[0] for t in at.toggle} >= {"SA", "SR", "CR"}
    at.toggle(key="un_sr").set_value(False).run()
    at.number_input(key="un_structguard_ours_k8_max_epochs").set_value(3).run()  # defaults tuned for k near 8
    at.number_input(key="un_seed").set_value(7).run()
    arithmetic = at.selectbox(key="un_structguard_ours_k8_precision")
    assert arithmetic.label == "Arithmetic" and arithmetic.options == ["auto", "fp32", "bf16"]
    arithmetic.set_value("bf16").run()
    at.selectbox(key="un_structguard_ours_k8_train_from").set_value("layer3").run()
    pairs = at.selectbox(key="un_structguard_ours_k8_mix_pairs")
    assert pairs.label == "Mixture pairs" and pairs.options == ["any", "distinct", "cross"] and pairs.value == "any"
    pairs.set_value("cross").run()
    polish = at.number_input(key="un_structguard_ours_k8_polish_steps")
    assert polish.label == "Polish steps" and polish.value == 0 and polish.min == 0
    polish.set_value(40).run()
    keeps = at.selectbox(key="un_structguard_ours_k8_polish_pick")
    assert keeps.label == "Polish keeps" and keeps.options == ["last", "mix_kl"] and keeps.value == "last"
    keeps.set_value("mix_kl").run()
    next(b for b in at.button if b.label == "Start unlearning").click().run()
    no_exceptions(at)
    assert at.get("progress") and any(b.label == "Cancel" for b in at.button)
    fake.gate.set()
    wait_for_job(at)
    no_exceptions(at)
    req = fake.requests[-1]
    assert req.method == "structguard" and req.seed == 7 and sorted(req.forget_ids) == [0, 1, 2, 3]
    assert req.config["sr"] is False and req.config["max_epochs"] == 3
    assert req.config["precision"] == "bf16" and req.config["train_from"] == "layer3"
    assert req.config["mix_pairs"] == "cross" and req.config["polish_steps"] == 40
    assert req.config["polish_pick"] == "mix_kl"
    assert at.title[0].value == "Audit", ([e.value for e in at.error], [w.value for w in at.warning])
    from dashboard import jobs

    job = jobs.registry()[at.session_state.token]  # the sidebar polls a few seconds more (recover_stale_page),
    assert job.handled and job.settling()           # then stops, without re-running the page again and again
    job.handled_at -= jobs.SETTLE_S
    at.switch_page("app_pages/audit.py").run()
    no_exceptions(at)
    assert at.title[0].value == "Audit" and not job.settling()

    at.switch_page("app_pages/unlearn.py").run()
    at.segmented_control(key="un_method").set_value("neggrad").run()
    no_exceptions(at)
    assert not any(t.label.startswith("SA") for t in at.toggle)
    labels = [n.label for n in at.number_input]
    assert "PGD radius ε (L2)" not in labels and "Max epochs" in labels

    # the authors' loop is one choice away, with its own defaults, and reaches the engine as schedule="paper"
    at.segmented_control(key="un_method").set_value("structguard").run()
    at.segmented_control(key="un_schedule").set_value("paper").run()
    no_exceptions(at)
    assert at.number_input(key="un_structguard_paper_k8_pgd_iters").value == 100
    assert at.number_input(key="un_structguard_paper_k8_lr").value == 0.005
    at.number_input(key="un_structguard_paper_k8_max_epochs").set_value(1).run()
    at.number_input(key="un_structguard_paper_k8_pgd_iters").set_value(1).run()
    next(b for b in at.button if b.label == "Start unlearning").click().run()
    fake.gate.set()
    wait_for_job(at)
    no_exceptions(at)
    req = fake.requests[-1]
    assert req.config["schedule"] == "paper" and req.config["pgd_iters"] == 1 and req.config["lr"] == 0.005


def test_unlearn_cancel_keeps_runs_intact(app_env, monkeypatch) -> None:
    fake = GatedEngine(block=True)
    use_fake_engine(monkeypatch, fake)
    before = {p.run_id for p in runs.list_runs(app_env["STRUCTGUARD_RUNS"])}
    at = new_app()
    at.session_state.selection = {4, 5}
    at.switch_page("app_pages/unlearn.py").run()
    next(b for b in at.button if b.label == "Start unlearning").click().run()
    time.sleep(0.3)
    at.run()
    assert at.get("progress"), "progress bar while running"
    next(b for b in at.button if b.label == "Cancel").click().run()
    wait_for_job(at)
    assert any("cancelled" in w.value for w in at.warning)
    assert {p.run_id for p in runs.list_runs(app_env["STRUCTGUARD_RUNS"])} == before


# ---------------------------------------------------------------- Audit


@pytest.fixture(scope="module")
def saved_run(app_env) -> Path:
    return make_real_run(Path(app_env["STRUCTGUARD_RUNS"]), app_env["STRUCTGUARD_MODEL"], "structguard", [10, 20, 30])


def test_audit_sections(app_env, saved_run) -> None:
    at = new_app()
    at.session_state.current_run = saved_run
    at.switch_page("app_pages/audit.py").run()
    no_exceptions(at)
    labels = [m.label for m in at.metric]
    assert "Forget accuracy" in labels and "Test accuracy" in labels
    assert any(lbl.startswith("Structure") for lbl in labels)
    assert len(at.download_button) >= 2
    for section in ["Drift", "Affinity", "Grad-CAM", "Membership inference", "Record", "Accuracy"]:
        at.segmented_control(key="audit_section").set_value(section).run()
        no_exceptions(at)
        assert not at.error, (section, [e.value for e in at.error])
        if section != "Record":
            assert at.get("plotly_chart"), section
        if section == "Membership inference":  # the threshold-free AUC, the original's and the run's
            assert any(c.value.startswith("Forget AUC vs test") and "unlearned 0." in c.value for c in at.caption)
    next(b for b in at.button if b.label == "Prepare HTML report").click().run()
    no_exceptions(at)
    assert any(d.proto.label == "Download HTML report" for d in at.download_button)


def test_audit_says_which_step_a_polished_run_returned(app_env, saved_run) -> None:
    at = new_app()
    at.session_state.current_run = saved_run
    at.switch_page("app_pages/audit.py").run()
    assert not any("weights from step" in c.value for c in at.caption)  # no polish steps: the last step's weights
    meta = json.loads((saved_run / "run.json").read_text())
    meta["polish"] = {"from": 1, "until": meta["steps"], "returned": 1, "pick": "mix_kl", "score": 0.2}
    (saved_run / "run.json").write_text(json.dumps(meta))
    at = new_app()
    at.session_state.current_run = saved_run
    at.switch_page("app_pages/audit.py").run()
    no_exceptions(at)
    assert any("weights from step 1: the lowest mixture KL" in c.value for c in at.caption)


# ---------------------------------------------------------------- Runs


def test_runs_table_compare_damaged_lineage_continue_delete(app_env, saved_run) -> None:
    root = Path(app_env["STRUCTGUARD_RUNS"])
    child = make_real_run(root, app_env["STRUCTGUARD_MODEL"], "structguard", [40], parent=saved_run.name, seed=1)
    at = new_app()
    unreadable = root / "20000101-000000-neggrad-k1-s0"  # nobody can tell whose: read-only for every session
    unreadable.mkdir(parents=True, exist_ok=True)
    (unreadable / "run.json").write_text("{not json")
    damaged = root / "20000101-000001-neggrad-k1-s0"  # this session's, without metrics
    damaged.mkdir(parents=True, exist_ok=True)
    (damaged / "run.json").write_text(json.dumps(
        {"run_id": damaged.name, "status": "complete", "method": "neggrad",
         "owner": runs.owner_record(runs.owner_hash(at.session_state.owner_secret))}))
    at.switch_page("app_pages/runs.py").run()
    no_exceptions(at)
    table = at.dataframe[0].value
    assert [str(s)[:7] for s in table["status"][-2:]] == ["damaged", "damaged"]
    origins = dict(zip(table["run"], table["origin"], strict=True))
    assert {r: origins[r] for r in (child.name, saved_run.name, damaged.name, unreadable.name)} == {
        child.name: "CLI", saved_run.name: "CLI", damaged.name: "this session",
        unreadable.name: "unknown (no owner recorded)"}
    assert "shared by another session" not in origins.values()  # earlier tests' sessions' runs are not listed
    ids = list(table["run"])

    at.session_state.compare_runs = [saved_run.name, child.name]
    at.session_state.runs_rev = 1
    at.run()
    no_exceptions(at)
    assert any("Comparison of 2 runs" in s.value for s in at.subheader)

    at.session_state.compare_runs = [child.name]
    at.session_state.runs_rev = 2
    at.run()
    assert any(s.value == "Lineage" for s in at.subheader)
    next(b for b in at.button if b.label == "Continue from this run").click().run()
    no_exceptions(at)
    assert at.title[0].value == "Unlearn"
    assert at.session_state.continue_from == str(child)

    at.switch_page("app_pages/runs.py").run()
    at.session_state.compare_runs = [unreadable.name]
    at.session_state.runs_rev = 3
    at.run()
    assert any("Read-only here" in c.value for c in at.caption)
    next(b for b in at.button if b.label == "Delete for good").click().run()
    assert unreadable.is_dir() and any("read-only here: it records no owner" in e.value for e in at.error)
    at.session_state.compare_runs = [damaged.name]
    at.session_state.runs_rev = 4
    at.run()
    next(b for b in at.button if b.label == "Delete for good").click().run()
    no_exceptions(at)
    assert not damaged.exists() and child.exists()
    assert [i.run_id for i in runs.visible_runs(root, at.session_state.owner_secret)] == \
        [i for i in ids if i != damaged.name]


# ---------------------------------------------------------------- isolation


def test_two_sessions_never_share_selection_or_jobs(app_env, monkeypatch) -> None:
    fake = GatedEngine(block=True)
    use_fake_engine(monkeypatch, fake)
    a, b = new_app(), new_app()
    assert a.session_state.token != b.session_state.token
    a.switch_page("app_pages/forget_set.py").run()
    b.switch_page("app_pages/forget_set.py").run()
    a.button(key=next(x.key for x in a.button if x.key and x.key.startswith("tg_"))).click().run()
    b.run()
    assert len(a.session_state.selection) == 1 and b.session_state.selection == set()

    a.switch_page("app_pages/unlearn.py").run()
    next(x for x in a.button if x.label == "Start unlearning").click().run()
    b.switch_page("app_pages/unlearn.py").run()
    assert not b.get("progress"), "session B must not see A's job"
    from dashboard import jobs, session

    # A third session that copies A's URL token (?s=...) while A is alive gets a token of its own: it neither
    # sees A's job nor can replace it by starting one ...
    monkeypatch.setattr(session, "session_alive", lambda sid: True)
    c = AppTest.from_file(APP, default_timeout=TIMEOUT)
    c.query_params["s"] = a.session_state.token
    c.run()
    c.session_state.selection = {7}
    c.switch_page("app_pages/unlearn.py").run()
    assert c.session_state.token != a.session_state.token and not c.get("progress")
    next(x for x in c.button if x.label == "Start unlearning").click().run()
    assert jobs.registry()[a.session_state.token].status == "running"  # A's slot still holds A's job
    c_job = jobs.registry()[c.session_state.token]
    c_job.cancel_event.set()
    c_job.thread.join(10)
    # ... but after a reload (A's session is gone) the same token re-attaches to the running job.
    monkeypatch.setattr(session, "session_alive", lambda sid: False)
    d = AppTest.from_file(APP, default_timeout=TIMEOUT)
    d.query_params["s"] = a.session_state.token
    d.run()  # the Start page shows this session's job too
    assert d.session_state.token == a.session_state.token
    assert d.get("progress") and any("reloaded" in i.value for i in d.info)
    job = jobs.registry()[a.session_state.token]
    job.cancel_event.set()
    job.thread.join(10)
    assert job.status == "cancelled"


def test_dashboard_and_report_draw_the_same_drift_map(app_env, saved_run, tmp_path) -> None:
    """One view layer (core.audit.views): the Audit page and the HTML report place every point at the same
    coordinates, on the prediction path. (The old dashboard fitted its own map on backbone features.)"""
    import shutil

    import plotly.io as pio

    from core.audit.views import drift_view
    from core.report import build_report
    from core.runs import load_run

    report = build_report(saved_run, tmp_path / "r.html", gradcam=False)
    shutil.rmtree(saved_run / "views")  # the dashboard fits the map again instead of reading the report's cache
    at = new_app()
    at.session_state.current_run = saved_run
    at.switch_page("app_pages/audit.py").run()
    at.segmented_control(key="audit_section").set_value("Drift").run()
    no_exceptions(at)
    dash = pio.from_json(at.get("plotly_chart")[0].proto.spec)
    drawn = report.figs["drift"]
    assert len(dash.data) == len(drawn.data) > 0

    def values(v) -> np.ndarray:  # plotly's JSON keeps arrays as {"dtype", "bdata": base64}
        if isinstance(v, dict) and "bdata" in v:
            return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).astype(float)
        return np.asarray(v, dtype=float)

    for a, b in zip(dash.data, drawn.data, strict=True):
        np.testing.assert_array_equal(values(a.x), values(b.x))
        np.testing.assert_array_equal(values(a.y), values(b.y))
    # and the check can fail: with a learned projector (the default keeps it the identity), StructGuard's backbone
    # features land elsewhere in the same map
    learned = make_real_run(tmp_path / "learned", app_env["STRUCTGUARD_MODEL"], "structguard", [10, 20, 30],
                            config={"projector_lr": 0.01})
    rec = load_run(learned)
    backbone = drift_view(learned, rec.audit, rec.meta, space="backbone")
    prediction = drift_view(learned, rec.audit, rec.meta)
    assert not np.allclose(backbone.result.after, prediction.result.after)


def test_unlearn_settings_survive_a_visit_to_other_pages(app_env) -> None:
    """Streamlit deletes the state of widgets a run does not draw; a budget set on Unlearn is kept anyway."""
    at = new_app()
    at.switch_page("app_pages/unlearn.py").run()

    def pgd() -> int:
        return next(n.value for n in at.number_input if n.label == "PGD iterations")

    default = pgd()
    next(n for n in at.number_input if n.label == "PGD iterations").set_value(default + 3).run()
    for page in ("app_pages/audit.py", "app_pages/runs.py", "app_pages/forget_set.py"):
        at.switch_page(page).run()
        at.run()
    at.switch_page("app_pages/unlearn.py").run()
    assert not at.exception
    assert pgd() == default + 3

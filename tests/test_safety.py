"""Data safety (issue 13, items 2, 3 and 5): strict ids, complete-run checks, atomic writes, the bounded cache.

- ids: integers only everywhere (the file parser and the pipeline), one id in every format, duplicates
  reported, a file of another dataset refused naming both;
- run folders: a run.json without metrics (or a truncated audit.npz) is listed as damaged with its reason;
  every command that takes a run folder refuses one that is not complete (exit 2, one line); the Audit
  and Runs pages say what happened to a damaged or deleted run instead of raising or switching runs;
- writes: atomic, no partial file after a failure (a full disk is simulated at the OS level: the process's
  file-size limit, or the one OS file object of core.runs.write_atomic failing with ENOSPC; tests run as
  root, so read-only folders are simulated by a path whose parent is a file); one file mode for the whole
  run folder; the original model's output cache bounded by $STRUCTGUARD_CACHE_MB (least recently used first);
  no server path in a page's message.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import fake_metrics, fake_run

from core import pipeline, runs
from core.data import FASHION_CLASSES, load_dataset
from core.engine import Callbacks, UnlearnedModel, UnlearnError
from core.forget_ids import ForgetIdsError, parse_forget_ids, parse_forget_ids_file, read_forget_ids
from core.metrics import outputs
from core.models import SAMPLE_MODELS

REPO = Path(__file__).resolve().parent.parent
TINY = {"pgd_iters": 1, "n_adv": 2, "max_epochs": 1}
needs_sample_model = pytest.mark.skipif(not (SAMPLE_MODELS / "fmnist_resnet18_narrow.json").is_file(),
                                        reason="needs the sample model sample_models/fmnist_resnet18_narrow")


# ---------------------------------------------------------------- helpers


def one_error_line(err: str) -> str:
    """The one error line, last on stderr; before it only `report`'s progress lines ("  drift ...")."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert all(ln.startswith("  ") and ln.endswith(" ...") for ln in lines[:-1]), err
    return lines[-1]


def cli(capsys, *args: str) -> tuple[int, str]:
    """`python -m core ARGS` in this process: (exit code, the one stderr line)."""
    from core.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, (one_error_line(err) if code == 2 else err)


class FullDisk:
    """The OS file object behind core.runs.write_atomic, failing like a full disk after `room` bytes
    (what it wrote until then stays on disk, as a real full disk leaves it)."""

    def __init__(self, room: int = 1000) -> None:
        self.room, self.calls = room, 0

    def __call__(self, fd: int, mode: str = "wb"):
        self.calls += 1
        real, outer = os.fdopen(fd, mode), self

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data) -> int:
                data = bytes(data)
                if len(data) > outer.room:
                    real.write(data[:outer.room])
                    real.flush()
                    outer.room = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                outer.room -= len(data)
                return real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

        return File()


@contextmanager
def file_size_limit(limit: int):
    """The OS refuses to grow any file of this process beyond `limit` bytes (EFBIG), as a full disk would."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def no_partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part") or p.name.endswith(".partial")
            or ".tmp" in p.name]


@pytest.fixture(scope="module")
def real_run(subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete NegGrad run of the real engine (tiny budget), to copy from."""
    if not (SAMPLE_MODELS / "fmnist_resnet18_narrow.json").is_file():
        pytest.skip("needs the sample model sample_models/fmnist_resnet18_narrow")
    root = tmp_path_factory.mktemp("real_runs")
    req = pipeline.RunRequest(forget_ids=[10, 20, 30], method="neggrad", config=dict(TINY), data_dir=str(subset_dir),
                              runs_root=str(root), encoder="clip-random:ViT-S-32", retain_eval=200, audit_per_class=3)
    return pipeline.execute_run(req)


def copy_run(run: Path, root: Path, run_id: str) -> Path:
    dst = shutil.copytree(run, root / run_id)
    meta = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps(dict(meta, run_id=run_id)))
    return dst


# ---------------------------------------------------------------- item 2: strict ids


@pytest.fixture
def tiny_ds(write_idx_dir):
    return load_dataset("fashion-mnist", write_idx_dir(n_train=60, n_test=20))


@pytest.mark.parametrize("ids,shown", [
    ([1.5, 2.7], "1.5"), ([3.0], "3.0"), ([True, 5], "True"), ([1, "2"], "'2'"), ([np.float64(4.0)], "4.0"),
    ([np.bool_(True)], "True"),
])
def test_the_pipeline_refuses_what_is_not_an_integer(tiny_ds, ids, shown) -> None:
    """The last gate (a RunRequest built by any caller): never rounds, converts or coerces."""
    with pytest.raises(UnlearnError, match="forget ids must be integers; got") as info:
        pipeline.validate_forget_ids(ids, tiny_ds)
    assert shown in str(info.value)


def test_the_pipeline_accepts_python_and_numpy_integers(tiny_ds) -> None:
    assert pipeline.validate_forget_ids([np.int64(3), 4, np.int32(5)], tiny_ds) == [3, 4, 5]
    with pytest.raises(UnlearnError, match="repeats ids .3."):
        pipeline.validate_forget_ids([3, np.int64(3)], tiny_ds)


@pytest.mark.parametrize("text", [
    "[5]", "5", "5\n", " 5 ", "# one image\n5\n", '{"ids": [5]}', '{"forget_ids": [5]}',
    '{"dataset": "fashion-mnist", "split": "train", "ids": [5]}', b"\xef\xbb\xbf5\r\n",
])
def test_a_single_id_is_accepted_in_every_format(text, tmp_path) -> None:
    assert parse_forget_ids(text, dataset="fashion-mnist") == [5]
    path = tmp_path / "ids.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert read_forget_ids(path, dataset="fashion-mnist") == [5]


@pytest.mark.parametrize("text", ["[1.0]", "[true]", '["5"]', '{"ids": ["5"]}', '{"ids": [5.5]}', "5.0", "true",
                                  '"5"', "[1e2]"])
def test_floats_booleans_and_numeric_strings_are_refused(text) -> None:
    with pytest.raises(ForgetIdsError, match="not a non-negative integer id"):
        parse_forget_ids(text)


@pytest.mark.parametrize("text", ["[3, 4, 3]", "3\n4\n3\n", '{"ids": [3, 4, 3]}', '{"forget_ids": [3, 3]}',
                                  "3, 4, 3"])
def test_duplicates_are_reported_in_every_format(text) -> None:
    """Never dropped silently (the dashboard's import uses the same parser)."""
    with pytest.raises(ForgetIdsError, match="id.s. 3 more than once"):
        parse_forget_ids(text)


@pytest.mark.parametrize("dataset", ["cifar10", {"name": "cifar10"}])
def test_a_file_of_another_dataset_is_refused_naming_both(dataset, tmp_path) -> None:
    path = tmp_path / "cifar_ids.json"
    path.write_text(json.dumps({"dataset": dataset, "ids": [5]}))
    assert parse_forget_ids_file(path.read_text()).dataset == "cifar10"
    with pytest.raises(ForgetIdsError) as info:
        read_forget_ids(path, dataset="fashion-mnist")
    assert "'cifar10'" in str(info.value) and "'fashion-mnist'" in str(info.value)


# ---------------------------------------------------------------- item 3: complete runs only


def test_listing_marks_incomplete_runs_damaged_with_the_reason(tmp_path) -> None:
    root = tmp_path / "runs"
    good = fake_run(root, "20990101-000000-neggrad-k1-s0")
    no_metrics = fake_run(root, "20990101-000001-neggrad-k1-s0", metrics=None)
    partial_metrics = fake_run(root, "20990101-000002-neggrad-k1-s0",
                               metrics={"before": fake_metrics()["before"], "after": {"forget_acc": 0.0}})
    no_method = fake_run(root, "20990101-000003-neggrad-k1-s0", method=None)
    not_complete = fake_run(root, "20990101-000004-neggrad-k1-s0", status="running")
    truncated = fake_run(root, "20990101-000005-neggrad-k1-s0")
    np.savez_compressed(truncated / "audit.npz", big=np.random.default_rng(0).random(5000))
    data = (truncated / "audit.npz").read_bytes()
    (truncated / "audit.npz").write_bytes(data[: len(data) // 2])
    listed = {r.run_id: r for r in runs.list_runs(root)}
    assert listed[good.name].ok and listed[good.name].error is None
    expected = {no_metrics: "run.json has no metrics", partial_metrics: "after unlearning lack retain_acc, test_acc",
                no_method: "names no method", not_complete: "does not mark the run complete",
                truncated: "audit.npz is damaged"}
    for path, why in expected.items():
        info = listed[path.name]
        assert info.status == "damaged" and not info.ok and why in info.error, (path.name, info.error)
    with pytest.raises(runs.RunError, match="run.json has no metrics"):
        runs.load_run(no_metrics, strict=True)
    assert "run.json has no metrics" in runs.load_run(no_metrics).missing


def test_commands_refuse_a_folder_that_is_not_a_complete_run(capsys, tmp_path) -> None:
    """`report` and `unlearn --parent`: exit 2 and one line naming the reason, before any work."""
    root = tmp_path / "runs"
    no_metrics = fake_run(root, "20990101-000001-neggrad-k1-s0", metrics=None)
    truncated = fake_run(root, "20990101-000002-neggrad-k1-s0")
    (truncated / "audit.npz").write_bytes(b"PK\x03\x04 truncated")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0\n")
    out = tmp_path / "out"
    cases = [
        (("report", str(etc), "-o", str(out / "a.html")), "has no run.json"),
        (("report", str(tmp_path / "nowhere")), "is not a directory"),
        (("report", str(no_metrics), "-o", str(out / "b.html")),
         "damaged, not a complete run: run.json has no metrics"),
        (("report", str(truncated), "-o", str(out / "c.html")), "audit.npz is damaged"),
        (("unlearn", "--method", "neggrad", "--k", "1", "--parent", str(no_metrics), "--runs-dir", str(root)),
         "--parent:"),
        (("unlearn", "--method", "neggrad", "--k", "1", "--parent", str(etc), "--runs-dir", str(root)),
         "has no run.json"),
    ]
    for args, needle in cases:
        code, line = cli(capsys, *args)
        assert code == 2 and needle in line, (args, line)
    assert not out.exists() and not (etc / "report.html").exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([no_metrics.name, truncated.name])


# ---------------------------------------------------------------- item 5: atomic writes, the cache, file modes


def test_an_atomic_write_on_a_full_disk_leaves_the_old_file_and_no_part(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.html"
    target.write_text("the previous report")
    disk = FullDisk(room=10)
    monkeypatch.setattr(runs, "_fdopen", disk)
    with pytest.raises(runs.StorageError) as info:
        runs.write_atomic(target, "x" * 10_000, what="the report")
    assert disk.calls == 1
    assert str(info.value) == ("could not save the report: the disk is full; nothing was left behind; "
                               "free some space and try again")
    assert target.read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_storage_messages_name_no_path() -> None:
    for code, why in ((errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only file system"),
                      (errno.EACCES, "not writable"), (errno.ENOTDIR, "a file stands where a folder is needed")):
        exc = OSError(code, os.strerror(code), "/srv/structguard/runs/.x.partial/audit.npz")
        msg = str(runs.storage_error(exc, "the run"))
        assert why in msg and "/srv" not in msg and "audit.npz" not in msg
    assert runs.redact_paths("[Errno 28] No space left on device: '/srv/app/runs/r1/model.json'") == \
        "[Errno 28] No space left on device: 'model.json'"
    assert runs.redact_paths("see https://example.org/a/b and runs/<run_id>") == \
        "see https://example.org/a/b and runs/<run_id>"


def test_report_on_a_full_disk_leaves_nothing(real_run, tmp_path, monkeypatch) -> None:
    from core.report import build_report

    run = copy_run(real_run, tmp_path / "runs", real_run.name)
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    monkeypatch.setattr(runs, "_fdopen", FullDisk(room=1000))  # the report is megabytes, the views kilobytes
    with pytest.warns(UserWarning, match="audit view not cached"), \
            pytest.raises(runs.StorageError, match="could not save the report: the disk is full"):
        build_report(run, drift_method="pca", gradcam=False)
    assert not (run / "report.html").exists() and no_partial_files(run) == []
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == before


def test_cli_report_on_a_full_disk_is_one_line_and_leaves_nothing(real_run, tmp_path) -> None:
    """The real OS limit (RLIMIT_FSIZE: writes beyond 1 MB fail), in a `python -m core report` process."""
    out = tmp_path / "out"
    out.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "core", "report", str(real_run), "-o", str(out / "r.html"),
                           "--drift", "pca", "--no-gradcam"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=limit, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert line == ("error: could not save the report: the file is larger than the system allows; nothing was left "
                    "behind; free some space and try again")
    assert list(out.iterdir()) == []


def test_cli_report_into_an_unwritable_place(real_run, tmp_path, capsys) -> None:
    """Tests run as root (chmod cannot make a folder read-only for them): a file stands where the folder should."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    code, line = cli(capsys, "report", str(real_run), "-o", str(blocker / "r.html"), "--drift", "pca", "--no-gradcam")
    assert code == 2 and "could not save the report: a file stands where a folder is needed" in line
    assert str(tmp_path) not in line


def save_with_fakes(root: Path, tiny_model, audit: dict) -> Path:
    """core.pipeline.save, the run's last stage, with stand-ins for what the earlier stages made."""
    res = SimpleNamespace(request=SimpleNamespace(runs_root=str(root), method="neggrad", seed=0), k=1,
                          start=SimpleNamespace(card={"arch": "resnet18_narrow"}))
    unl = SimpleNamespace(model=UnlearnedModel(tiny_model))
    return pipeline.save(res, unl, lambda run_id, card: {"run_id": run_id, "method": "neggrad",
                                                          "metrics": fake_metrics()}, audit, Callbacks())


@pytest.mark.parametrize("where,limit,audit_mb", [("weights", 200_000, 0), ("audit arrays", 4_000_000, 8)])
def test_a_run_that_cannot_be_saved_leaves_nothing(tiny_model, tmp_path, where, limit, audit_mb) -> None:
    """A full disk while the run is written (the OS refuses to grow files): one clear error, no partial folder."""
    root = tmp_path / "runs"
    root.mkdir()
    audit = {"ids": np.arange(3), "noise": np.random.default_rng(0).random(audit_mb * 2**17)}
    with file_size_limit(limit), pytest.raises(runs.StorageError) as info:
        save_with_fakes(root, tiny_model, audit)
    assert str(info.value).startswith("could not save the run: the file is larger than the system allows; "
                                      "nothing was left behind"), (where, str(info.value))
    assert list(root.iterdir()) == [], where
    saved = save_with_fakes(root, tiny_model, {"ids": np.arange(3)})  # and with room again, it saves
    assert runs.list_runs(root)[0].path == saved


def test_runs_into_an_unwritable_folder_fail_before_any_work(capsys, tmp_path, write_idx_dir, tiny_model) -> None:
    from core.models import save_model

    save_model(tiny_model, tmp_path / "model", {"arch": "resnet18_narrow", "dataset": "fashion-mnist",
                                               "class_names": list(FASHION_CLASSES), "input_shape": [1, 28, 28]})
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "ids.txt").write_text("1\n2\n")
    t0 = time.monotonic()
    code, line = cli(capsys, "unlearn", "--method", "neggrad", "--ids", str(tmp_path / "ids.txt"), "--model",
                     str(tmp_path / "model"), "--data-dir", str(write_idx_dir()), "--encoder", "clip-random:ViT-S-32",
                     "--runs-dir", str(blocker / "runs"), "--device", "cpu")
    assert code == 2, line
    assert line == ("error: could not save the run: a file stands where a folder is needed; nothing was left behind; "
                    "make the folder writable (or choose another one) and try again")
    assert time.monotonic() - t0 < 120


@needs_sample_model
def test_every_file_of_a_run_has_the_umask_mode(real_run, tmp_path) -> None:
    """model.safetensors included (safetensors' own writer makes it 0600), and the audit views cached later."""
    from core.audit.views import drift_view

    run = copy_run(real_run, tmp_path / "runs", real_run.name)
    rec = runs.load_run(run)
    drift_view(run, rec.audit, rec.meta, method="pca")
    expected = runs.file_mode()
    assert expected == 0o666 & ~_umask()
    files = [p for p in list(real_run.rglob("*")) + list((run / "views").rglob("*")) if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "audit.npz", "model.safetensors", "model.json"}
    assert any(p.parent.name == "views" for p in files)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_view_cache_on_a_full_disk_leaves_no_part(tmp_path, monkeypatch) -> None:
    from core.audit import views

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(runs, "_fdopen", FullDisk(room=100))
    with pytest.warns(UserWarning, match="not cached: could not save the audit view cache: the disk is full"):
        views._write_cache(run / "views" / "drift.npz", {"a": np.zeros(10_000)})
    assert [p.name for p in run.rglob("*")] == ["views"]
    shutil.rmtree(run)
    with pytest.warns(UserWarning, match="not cached"):  # a deleted run is not re-created
        views._write_cache(run / "views" / "drift.npz", {"a": np.zeros(3)})
    assert not run.exists()


def test_cache_size_setting(monkeypatch) -> None:
    for raw, expected in (("", 256 * 2**20), ("10", 10 * 2**20), ("0.5", 2**19), ("0", 0), ("-3", 0),
                          ("lots", 256 * 2**20), ("nan", 256 * 2**20)):
        monkeypatch.setenv("STRUCTGUARD_CACHE_MB", raw)
        assert runs.cache_limit_bytes() == expected, raw
    monkeypatch.delenv("STRUCTGUARD_CACHE_MB")
    assert runs.cache_limit_bytes() == runs.DEFAULT_CACHE_MB * 2**20


def test_the_cache_drops_least_recently_used_files_first(tmp_path) -> None:
    cache = tmp_path / ".cache"
    cache.mkdir()
    now = time.time()
    for i, name in enumerate(["a", "b", "c", "d"]):  # a is the oldest
        p = cache / f"original-{name}.npz"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 100 + i, now - 100 + i))
    stale = cache / ".original-e.npz.123.part"  # left by a killed process
    stale.write_bytes(b"x")
    os.utime(stale, (now - 2 * runs.PARTIAL_MAX_AGE_S,) * 2)
    runs.touch(cache / "original-a.npz")  # read just now: the most recently used
    assert runs.prune_cache(cache, limit=2500, keep=cache / "original-d.npz") == 3
    assert sorted(p.name for p in cache.iterdir()) == ["original-a.npz", "original-d.npz"]
    assert runs.prune_cache(cache, limit=0, keep=cache / "original-d.npz") == 1  # the file just written stays
    assert [p.name for p in cache.iterdir()] == ["original-d.npz"]


def test_original_outputs_keep_the_cache_within_its_bound(tmp_path, monkeypatch, tiny_model, write_idx_dir) -> None:
    ds = load_dataset("fashion-mnist", write_idx_dir(n_train=60, n_test=20))
    cache = tmp_path / "runs" / ".cache"
    monkeypatch.setattr(pipeline, "_ORIGINAL_CACHE", {})
    pipeline.original_outputs("model:first", tiny_model, ds.train, torch.arange(10), cache)
    one = next(cache.iterdir()).stat().st_size  # every entry here has the same size
    monkeypatch.setenv("STRUCTGUARD_CACHE_MB", str(2.5 * one / 2**20))  # room for two entries
    for i in range(6):
        time.sleep(0.01)  # distinct modification times
        pipeline.original_outputs(f"model:{i}", tiny_model, ds.train, torch.arange(10), cache)
        assert sum(p.stat().st_size for p in cache.iterdir()) <= 2.5 * one, i
    names = {p.name for p in cache.iterdir()}
    assert len(names) == 2 and no_partial_files(cache) == []
    # the two most recent keys are the ones kept (file names are hashes of the keys: compute them by writing again)
    monkeypatch.setattr(pipeline, "_ORIGINAL_CACHE", {})
    pipeline.original_outputs("model:5", tiny_model, ds.train, torch.arange(10), cache)
    assert {p.name for p in cache.iterdir()} == names
    monkeypatch.setenv("STRUCTGUARD_CACHE_MB", "0")  # no disk cache at all
    shutil.rmtree(cache)
    pipeline.original_outputs("model:x", tiny_model, ds.train, torch.arange(10), cache)
    assert not cache.exists()


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch, tiny_model, write_idx_dir) -> None:
    ds = load_dataset("fashion-mnist", write_idx_dir(n_train=60, n_test=20))
    monkeypatch.setattr(pipeline, "_ORIGINAL_CACHE", {})
    blocker = tmp_path / "runs"
    blocker.write_text("")  # the cache's parent is a file
    out = pipeline.original_outputs("model:y", tiny_model, ds.train, torch.arange(10), blocker / ".cache")
    expected = outputs(tiny_model, ds.train, torch.arange(10))
    np.testing.assert_array_equal(out.probs, expected.probs)
    monkeypatch.setattr(pipeline, "_ORIGINAL_CACHE", {})
    cache = tmp_path / "ok" / ".cache"
    monkeypatch.setattr(runs, "_fdopen", FullDisk(room=100))
    pipeline.original_outputs("model:y", tiny_model, ds.train, torch.arange(10), cache)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- the pages


def new_app(**state):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=180)
    at.run()
    for k, v in state.items():
        at.session_state[k] = v
    return at


def texts(at) -> str:
    parts = [e.value for kind in ("error", "warning", "info", "caption", "markdown") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


@needs_sample_model
def test_runs_page_lists_damaged_runs_with_their_reason(app_env) -> None:
    fake_run(app_env, "20990101-000000-neggrad-k1-s0")
    fake_run(app_env, "20990101-000001-neggrad-k1-s0", metrics=None)
    at = new_app()
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    status = dict(zip(at.dataframe[0].value["run"], at.dataframe[0].value["status"], strict=True))
    assert status == {"20990101-000000-neggrad-k1-s0": "complete",
                      "20990101-000001-neggrad-k1-s0": "damaged: run.json has no metrics"}
    assert str(app_env) not in texts(at)


@needs_sample_model
def test_audit_page_says_a_run_is_damaged_or_deleted_and_never_switches(app_env) -> None:
    fake_run(app_env, "20990101-000000-neggrad-k1-s0")
    damaged = fake_run(app_env, "20990101-000001-neggrad-k1-s0", metrics=None)
    at = new_app(current_run=damaged)
    at.switch_page("app_pages/audit.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("is damaged (run.json has no metrics)" in e.value for e in at.error), [e.value for e in at.error]
    assert at.selectbox[0].value is None and at.session_state.current_run == damaged  # not switched to another run

    gone = app_env / "20990101-000002-neggrad-k1-s0"
    at.session_state.current_run = gone  # as if deleted by another session while shown
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"Run `{gone.name}`, shown here before, was deleted" in e.value for e in at.error)
    assert at.selectbox[0].value is None and not at.metric
    assert str(app_env) not in texts(at)


@needs_sample_model
def test_audit_download_of_a_deleted_run_says_so(app_env, real_run) -> None:
    fake_run(app_env, "20990101-000000-neggrad-k1-s0")  # another run that stays
    run = copy_run(real_run, app_env, "20990101-000003-neggrad-k3-s0")
    at = new_app(current_run=run)
    at.switch_page("app_pages/audit.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox[0].value == run.name and at.metric
    shutil.rmtree(run)  # deleted elsewhere while the page is shown
    button = next(b for b in at.download_button if b.proto.label == "Download weights (safetensors)")
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("the weights could not be downloaded" in e and "was deleted while it was shown" in e for e in errors)
    assert at.selectbox[0].value is None  # the page did not switch to another run
    assert str(app_env) not in texts(at)


@needs_sample_model
def test_audit_report_on_a_full_disk_is_a_message(app_env, real_run, monkeypatch) -> None:
    run = copy_run(real_run, app_env, "20990101-000004-neggrad-k3-s0")
    monkeypatch.setattr(runs, "_fdopen", FullDisk(room=100_000))
    at = new_app(current_run=run)
    at.switch_page("app_pages/audit.py").run()
    next(b for b in at.button if b.label == "Prepare HTML report").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("The report could not be built: could not save the report: the disk is full" in e for e in errors)
    assert not any(d.proto.label == "Download HTML report" for d in at.download_button)
    assert no_partial_files(app_env) == [] and not (run / "report.html").exists()
    assert str(app_env) not in texts(at)


def test_saving_a_model_on_a_full_disk_keeps_the_old_one_and_leaves_no_part(tmp_path, monkeypatch) -> None:
    """`python -m core train --out` (save_model): the previous model stays whole, no partial file is left, and a
    saved model has the same file mode as the rest of the project's files (safetensors' own writer makes 0600)."""
    from core.models import create_model, load_model, save_model

    card = {"arch": "resnet18_narrow", "dataset": "fashion-mnist", "class_names": FASHION_CLASSES,
            "input_shape": [1, 28, 28]}
    torch.manual_seed(0)
    save_model(create_model("resnet18_narrow", 10, 1), tmp_path / "m", card)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(runs.file_mode())}
    monkeypatch.setattr(runs, "_fdopen", FullDisk(room=1000))
    torch.manual_seed(1)
    with pytest.raises(runs.StorageError, match="could not save the model weights: the disk is full"):
        save_model(create_model("resnet18_narrow", 10, 1), tmp_path / "m", card)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_model(str(tmp_path / "m"))  # still loads, checksum and all

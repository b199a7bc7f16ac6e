"""Runs belong to the session that made them (issue 13, item 1).

- core: the owner recorded in run.json (a secret's hash; the command line records "cli"), the listing a
  session sees, read-only enforcement (delete, share), the share key check, lineage that hides other
  sessions' runs;
- pages (AppTest): two sessions list and delete only their own runs; CLI and unrecorded runs are read-only
  with their origin shown; a share link opens one run read-only in another session and stops working when
  its owner stops sharing; a copied session URL never takes over a live session's job or runs.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from conftest import fake_run, write_fashion_idx
from streamlit.testing.v1 import AppTest

from core import pipeline, runs
from core.models import SAMPLE_MODELS

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "dashboard" / "app.py")
needs_sample_model = pytest.mark.skipif(not (SAMPLE_MODELS / "fmnist_resnet18_narrow.json").is_file(),
                                        reason="needs the sample model sample_models/fmnist_resnet18_narrow")


def session_owner(secret: str) -> dict:
    return runs.owner_record(runs.owner_hash(secret))


# ---------------------------------------------------------------- core


def test_owner_secret_is_stable_per_token_and_root_and_kept_private(tmp_path) -> None:
    root = tmp_path / "runs"
    a = runs.owner_secret("0123456789abcdef", root)
    assert a == runs.owner_secret("0123456789abcdef", root)
    assert a != runs.owner_secret("fedcba9876543210", root)
    assert "0123456789abcdef" not in a and len(a) == 64
    key = root / runs.OWNER_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # the server key: readable by the server only
    assert runs.owner_secret("0123456789abcdef", tmp_path / "other") != a  # each runs folder has its own key
    assert runs.list_runs(root) == [] and [p.name for p in root.iterdir()] == [runs.OWNER_KEY_FILE]


def test_owner_record_refuses_what_is_not_a_hash() -> None:
    assert runs.owner_record(None) == {"kind": "cli"}
    h = runs.owner_hash("s")
    assert runs.owner_record(h) == {"kind": "session", "sha256": h}
    for bad in ("s", h.upper(), h[:-1], 5):
        with pytest.raises(ValueError):
            runs.owner_record(bad)
    assert runs.run_origin({"owner": {"kind": "session", "sha256": h}}) == ("session", h)
    assert runs.run_origin({"owner": {"kind": "cli"}}) == ("cli", None)
    assert runs.run_origin({}) == ("unrecorded", None) and runs.run_origin(None) == ("unrecorded", None)


@needs_sample_model
def test_a_run_records_its_owner_and_the_command_line_records_cli(tmp_path) -> None:
    data_dir = write_fashion_idx(tmp_path / "fashion")
    secret = runs.owner_secret("0123456789abcdef", tmp_path / "runs")
    common = dict(forget_ids=[10, 20], method="neggrad", config={"max_epochs": 1}, data_dir=str(data_dir),
                  runs_root=str(tmp_path / "runs"), encoder="clip-random:ViT-S-32", retain_eval=100,
                  audit_per_class=2)
    owned = pipeline.execute_run(pipeline.RunRequest(**common, owner=runs.owner_hash(secret)))
    meta = json.loads((owned / "run.json").read_text())
    assert meta["owner"] == {"kind": "session", "sha256": runs.owner_hash(secret)}
    assert "owner" not in meta["request"] and secret not in (owned / "run.json").read_text()
    cli = pipeline.execute_run(pipeline.RunRequest(**common, seed=1))
    assert json.loads((cli / "run.json").read_text())["owner"] == {"kind": "cli"}
    with pytest.raises(ValueError):  # refused before any work
        pipeline.resolve(pipeline.RunRequest(**common, owner="not a hash"))
    seen = {i.run_id: (i.origin, i.access) for i in runs.visible_runs(tmp_path / "runs", secret)}
    assert seen == {owned.name: ("session", "own"), cli.name: ("cli", "read")}
    assert {i.run_id for i in runs.visible_runs(tmp_path / "runs", "another secret")} == {cli.name}


def test_listing_shows_a_session_its_own_runs_the_cli_and_unrecorded_ones(tmp_path) -> None:
    mine, theirs = "secret-a", "secret-b"
    fake_run(tmp_path, "20990101-000001-neggrad-k1-s0", session_owner(mine))
    fake_run(tmp_path, "20990101-000002-neggrad-k1-s0", session_owner(theirs))
    fake_run(tmp_path, "20990101-000003-neggrad-k1-s0", {"kind": "cli"})
    fake_run(tmp_path, "20990101-000004-neggrad-k1-s0")  # made before owners were recorded
    fake_run(tmp_path, "20990101-000005-neggrad-k1-s0", session_owner(mine), metrics=None)  # damaged, still mine
    fake_run(tmp_path, "20990101-000006-neggrad-k1-s0", session_owner(theirs), metrics=None)
    (tmp_path / "20990101-000007-neggrad-k1-s0").mkdir()  # no run.json: nobody can say whose
    seen = {i.run_id[13:15]: (i.access, i.origin_label, i.status) for i in runs.visible_runs(tmp_path, mine)}
    assert seen == {"01": ("own", "this session", "complete"),
                    "03": ("read", "CLI", "complete"),
                    "04": ("read", "unknown (no owner recorded)", "complete"),
                    "05": ("own", "this session", "damaged"),
                    "07": ("read", "unknown (no owner recorded)", "damaged")}
    other = {i.run_id[13:15] for i in runs.visible_runs(tmp_path, theirs)}
    assert other == {"02", "03", "04", "06", "07"}
    assert {i.run_id[13:15] for i in runs.visible_runs(tmp_path, None)} == {"03", "04", "07"}
    assert len(runs.list_runs(tmp_path)) == 7  # the command line's listing is unfiltered


def test_only_the_owner_deletes_or_shares(tmp_path) -> None:
    mine = fake_run(tmp_path, "20990101-000001-neggrad-k1-s0", session_owner("secret-a"))
    cli = fake_run(tmp_path, "20990101-000002-neggrad-k1-s0", {"kind": "cli"})
    old = fake_run(tmp_path, "20990101-000003-neggrad-k1-s0")
    for run, secret, why in ((mine, "secret-b", "belongs to another session"), (mine, None, "another session"),
                             (cli, "secret-a", "made from the command line"), (old, "secret-a", "records no owner")):
        for act in (lambda r, s: runs.delete_own_run(r, s, tmp_path), runs.share_run, runs.unshare_run):
            with pytest.raises(runs.ReadOnlyRun, match=why) as err:
                act(run, secret)
            assert str(tmp_path) not in str(err.value)
    assert mine.is_dir() and cli.is_dir() and old.is_dir() and not runs.is_shared(mine)
    with pytest.raises(FileNotFoundError):
        runs.delete_own_run(tmp_path / "20990101-000009-neggrad-k1-s0", "secret-a", tmp_path)
    runs.delete_own_run(mine, "secret-a", tmp_path)
    assert not mine.exists()


def test_share_key_opens_one_run_until_its_owner_stops_sharing(tmp_path) -> None:
    a = fake_run(tmp_path, "20990101-000001-neggrad-k1-s0", session_owner("secret-a"))
    b = fake_run(tmp_path, "20990101-000002-neggrad-k1-s0", session_owner("secret-a"))
    assert not runs.check_share_key(a, runs.share_key("secret-a", a.name))  # not shared yet
    key = runs.share_run(a, "secret-a")
    assert key == runs.share_key("secret-a", a.name) == runs.share_run(a, "secret-a")  # the same link again
    assert key not in (a / runs.SHARE_FILE).read_text() and "secret-a" not in (a / runs.SHARE_FILE).read_text()
    assert runs.check_share_key(a, key)
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "", None, 5, runs.share_key("secret-b", a.name)):
        assert not runs.check_share_key(a, wrong)
    assert not runs.check_share_key(b, key)  # one run only
    assert runs.share_key("secret-a", b.name) != key
    seen = {i.run_id: (i.access, i.origin_label) for i in runs.visible_runs(tmp_path, "secret-b", {a.name: key})}
    assert seen == {a.name: ("read", "shared by another session")}
    assert runs.visible_runs(tmp_path, "secret-b", {b.name: key}) == []  # a key of another run opens nothing
    assert [i.origin_label for i in runs.visible_runs(tmp_path, "secret-a") if i.run_id == a.name] == \
        ["this session (shared by link)"]
    runs.unshare_run(a, "secret-a")
    assert not runs.check_share_key(a, key) and runs.visible_runs(tmp_path, "secret-b", {a.name: key}) == []
    cli = fake_run(tmp_path, "20990101-000003-neggrad-k1-s0", {"kind": "cli"})
    (cli / runs.SHARE_FILE).write_text((a / "run.json").read_text())  # a share record on a run no session owns
    assert not runs.check_share_key(cli, key)


def test_run_ids_from_a_link_are_plain_names(tmp_path) -> None:
    assert runs.run_path(tmp_path, "20990101-000001-neggrad-k1-s0") == tmp_path / "20990101-000001-neggrad-k1-s0"
    for bad in ("../x", "a/b", ".cache", "..", "a..b", "", None, ["x"], "x" * 300, "/etc"):
        assert runs.run_path(tmp_path, bad) is None


def test_lineage_hides_other_sessions_runs(tmp_path) -> None:
    first = fake_run(tmp_path, "20990101-000001-neggrad-k1-s0", session_owner("secret-b"))
    second = fake_run(tmp_path, "20990101-000002-neggrad-k1-s0", session_owner("secret-a"), parent_run=first.name)
    chain = runs.lineage(second, visible={second.name})
    assert [c.get("hidden", False) for c in chain] == [True, False]
    assert first.name not in json.dumps(chain[0]) and chain[1]["run_id"] == second.name
    assert [c["run_id"] for c in runs.lineage(second)] == [first.name, second.name]


# ---------------------------------------------------------------- pages


def new_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def runs_table(at: AppTest) -> dict[str, str]:
    """run id -> origin, as the Runs page lists them."""
    at.switch_page("app_pages/runs.py").run()
    no_exceptions(at)
    if not at.dataframe:
        return {}
    df = at.dataframe[0].value
    return dict(zip(df["run"], df["origin"], strict=True))


def pick(at: AppTest, run_ids: list[str]) -> None:
    at.session_state.compare_runs = run_ids
    at.session_state.runs_rev = at.session_state["runs_rev"] + 1 if "runs_rev" in at.session_state else 1
    at.run()
    no_exceptions(at)


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("error", "warning", "info", "caption", "markdown", "code")
                     for e in getattr(at, kind))


@needs_sample_model
def test_two_sessions_list_and_delete_only_their_own_runs(app_env) -> None:
    a, b = new_app(), new_app()
    ra = fake_run(app_env, "20990101-000001-neggrad-k1-s0", session_owner(a.session_state.owner_secret))
    rb = fake_run(app_env, "20990101-000002-neggrad-k1-s0", session_owner(b.session_state.owner_secret))
    cli = fake_run(app_env, "20990101-000003-neggrad-k1-s0", {"kind": "cli"})
    assert runs_table(a) == {ra.name: "this session", cli.name: "CLI"}
    assert runs_table(b) == {rb.name: "this session", cli.name: "CLI"}
    assert a.session_state.owner_secret not in a.query_params["s"]  # the URL holds only the token

    pick(a, [cli.name])  # read-only: said so, and the delete refused even when clicked
    assert "Read-only here" in texts(a)
    next(x for x in a.button if x.label == "Delete for good").click().run()
    assert cli.is_dir() and any("is read-only here: it was made from the command line" in e.value for e in a.error)

    a.session_state.current_run = rb  # as if this session pointed at another session's run
    a.switch_page("app_pages/audit.py").run()
    no_exceptions(a)
    assert any("is no longer shared with this session" in e.value for e in a.error) and not a.metric
    assert rb.name not in a.selectbox[0].options

    at_runs = runs_table(a)
    pick(a, [ra.name])
    next(x for x in a.button if x.label == "Delete for good").click().run()
    no_exceptions(a)
    assert not ra.exists() and rb.is_dir() and at_runs
    assert runs_table(b) == {rb.name: "this session", cli.name: "CLI"}


@needs_sample_model
def test_share_link_opens_one_run_read_only_until_its_owner_stops(app_env) -> None:
    owner = new_app()
    shared = fake_run(app_env, "20990101-000001-neggrad-k1-s0", session_owner(owner.session_state.owner_secret))
    private = fake_run(app_env, "20990101-000002-neggrad-k1-s0", session_owner(owner.session_state.owner_secret))
    owner.session_state.current_run = shared
    owner.switch_page("app_pages/audit.py").run()
    no_exceptions(owner)
    assert "origin: this session" in texts(owner)
    owner.button(key="share_make").click().run()
    no_exceptions(owner)
    link = owner.code[0].value
    assert link.startswith("/audit?run=" + shared.name + "&key=") and runs.is_shared(shared)
    key = link.split("key=", 1)[1]

    visitor = new_app(run=shared.name, key=key)
    no_exceptions(visitor)
    assert visitor.title[0].value == "Audit" and visitor.selectbox[0].value == shared.name
    assert "origin: shared by another session (read-only)" in texts(visitor)
    assert "run" not in visitor.query_params and "key" not in visitor.query_params  # the key left the URL
    assert len(visitor.download_button) >= 2 and not [b for b in visitor.button if b.key == "share_make"]
    assert runs_table(visitor) == {shared.name: "shared by another session"}  # not the owner's other run
    pick(visitor, [shared.name])
    next(x for x in visitor.button if x.label == "Delete for good").click().run()
    assert shared.is_dir() and any("belongs to another session" in e.value for e in visitor.error)

    owner.run()  # the owner sees the same link again, then stops sharing
    assert owner.code[0].value == link
    owner.button(key="share_stop").click().run()
    no_exceptions(owner)
    assert not runs.is_shared(shared) and private.is_dir()
    visitor.switch_page("app_pages/audit.py").run()
    assert any("is no longer shared with this session" in e.value for e in visitor.error)
    assert runs_table(visitor) == {}

    for query in ({"run": shared.name, "key": key}, {"run": private.name, "key": key}, {"run": "../etc", "key": key},
                  {"run": shared.name}):
        other = new_app(**query)
        no_exceptions(other)
        assert any("This share link opens no run" in e.value for e in other.error), query
        assert other.session_state.get("current_run") is None
    assert str(app_env) not in texts(visitor)


@needs_sample_model
def test_a_copied_session_url_gets_a_new_session_while_its_owner_is_open(app_env, monkeypatch) -> None:
    from dashboard import session

    owner = new_app()
    run = fake_run(app_env, "20990101-000001-neggrad-k1-s0", session_owner(owner.session_state.owner_secret))
    monkeypatch.setattr(session, "session_alive", lambda sid: True)
    copy = new_app(s=owner.session_state.token)
    no_exceptions(copy)
    assert copy.session_state.token != owner.session_state.token
    assert copy.session_state.owner_secret != owner.session_state.owner_secret
    assert copy.query_params["s"] in (copy.session_state.token, [copy.session_state.token])
    assert any("belongs to a session that is open elsewhere" in i.value for i in copy.info)
    assert runs_table(copy) == {}
    assert runs_table(owner) == {run.name: "this session"}  # the owner keeps its token and its runs

    monkeypatch.setattr(session, "session_alive", lambda sid: False)  # the owner's page was closed or reloaded
    reload = new_app(s=owner.session_state.token)
    assert reload.session_state.token == owner.session_state.token
    assert reload.session_state.owner_secret == owner.session_state.owner_secret
    assert not reload.info and runs_table(reload) == {run.name: "this session"}
    # the old page, back after the reload took its token, is a new session too: never two holders at once
    monkeypatch.setattr(session, "session_alive", lambda sid: True)
    owner.run()
    assert owner.session_state.token != reload.session_state.token
    assert runs_table(owner) == {}

"""Per-session state of the dashboard, behind a few small helpers.

Everything here lives in `st.session_state`, so two browser sessions never see each
other's work: the forget selection, uploads, anchor texts and encoder, the current run,
the runs picked for comparison, queued messages, and the session's token (mirrored in the
URL as `?s=<token>` so that a reload finds its background job and its runs again).

One live browser session holds a token at a time (`session_token`): a URL copied from an open
page gives a new, empty session, never the owner's job or runs. The owner secret derived from
the token (core.runs.owner_secret) stays in session state and decides which saved runs are this
session's (core/runs.py, "ownership and sharing", states the whole rule).
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from core import runs as core_runs


def _ss(key: str, factory: Any) -> Any:
    if key not in st.session_state:
        st.session_state[key] = factory()
    return st.session_state[key]


# ------------------------------------------------------------------ identity


@dataclass
class Claim:
    """The browser session that holds a token now, and the share links opened under it (they outlive a reload)."""

    holder: tuple[str | None, str]  # session_id() of the holder
    grants: dict[str, str] = field(default_factory=dict)  # run id -> share key


_CLAIMS_LOCK = threading.Lock()


@st.cache_resource
def claims() -> dict[str, Claim]:
    """token -> its claim, for the whole process (the dict is cached, its entries are per token)."""
    return {}


def session_alive(session_id: str | None) -> bool:
    """Whether a browser is still connected to that Streamlit session."""
    if session_id is None:
        return False
    try:
        from streamlit.runtime import Runtime

        return Runtime.instance().is_active_session(session_id)
    except Exception:  # no runtime (AppTest): treat as alive
        return True


def _claim(given: str | None) -> str:
    """The token this session holds from now on: `given` unless another live session holds it."""
    me = session_id()
    with _CLAIMS_LOCK:
        table = claims()
        held = table.get(given) if given else None
        if given and (held is None or held.holder[1] == me[1] or not session_alive(held.holder[0])):
            table[given] = Claim(me, held.grants if held else {})  # first visit, or a reload: same workspace
            return given
        token = secrets.token_hex(8)
        table[token] = Claim(me)
        return token


COPIED = ("This page's link belongs to a session that is open elsewhere, so this is a new, empty session: its "
          "job and runs stay with that session. To show someone a run, use “Share this run” on the Audit page.")


def session_token() -> str:
    """Random per-session token, mirrored in the URL (?s=...) so a reload finds its job and runs again.

    A token that another live session holds (a copied URL) is never taken over: this session gets a new one.
    A session whose token was taken while its browser was away (the copy opened then) moves to a new one too."""
    token = st.session_state.get("token")
    if token is None:
        given = st.query_params.get("s")
        given = given if isinstance(given, str) and re.fullmatch(r"[0-9a-f]{16}", given) else None
        token = _claim(given)
        if given is not None and token != given:
            notice("info", COPIED)
    else:
        held = claims().get(token)
        if held is None or held.holder[1] != session_id()[1]:
            token = _claim(token)
            if token != st.session_state.token:
                notice("info", COPIED)
    if token != st.session_state.get("token"):
        st.session_state.token = token
        st.session_state.owner_secret = core_runs.owner_secret(token, core_runs.runs_root())
    if st.query_params.get("s") != token:
        st.query_params["s"] = token
    return token


def owner_secret() -> str:
    """This session's owner secret (core.runs.owner_secret of its token); never put in the URL."""
    session_token()
    return st.session_state.owner_secret


def grants() -> dict[str, str]:
    """Share links this session's token opened: run id -> key (checked again whenever runs are listed)."""
    token = session_token()
    with _CLAIMS_LOCK:
        claim = claims().get(token)
        return claim.grants if claim is not None else {}


def accept_share_link() -> bool:
    """A share link (?run=<run id>&key=<key>) gives this session read access to that run and shows it;
    a link that opens nothing says so. True when a run was opened. The key leaves the address bar."""
    run_id, key = st.query_params.get("run"), st.query_params.get("key")
    if run_id is None and key is None:
        return False
    for name in ("run", "key"):
        if name in st.query_params:
            del st.query_params[name]
    path = core_runs.run_path(core_runs.runs_root(), run_id)
    if path is None or not core_runs.check_share_key(path, key):
        notice("error", "This share link opens no run: the run was deleted, its owner stopped sharing it, "
                       "or the link is incomplete.")
        return False
    grants()[path.name] = str(key)
    set_current_run(path)
    return True


def session_id() -> tuple[str | None, str]:
    """(Streamlit session id, a nonce of this session's state): unique even where ids repeat (AppTest)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    nonce = _ss("nonce", lambda: secrets.token_hex(8))
    return (ctx.session_id if ctx else None, nonce)


# ------------------------------------------------------------------ forget set


def selection() -> set[int]:
    """Training-sample ids chosen for forgetting."""
    return _ss("selection", set)


def set_selection(ids: set[int] | list[int]) -> None:
    st.session_state.selection = {int(i) for i in ids}


def toggle(sample_id: int) -> None:
    sel = selection()
    sel.symmetric_difference_update({int(sample_id)})


@dataclass
class Upload:
    name: str
    pixels: np.ndarray  # uint8 [C, H, W] at the dataset's input size
    label: int


def uploads() -> list[Upload]:
    """User images added to the forget set (kept only in this session)."""
    return _ss("uploads", list)


# ------------------------------------------------------------------ anchors


def anchor_texts(defaults: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """This session's attribute lists per class (initialised from the defaults)."""
    if "anchor_texts" not in st.session_state and defaults is not None:
        st.session_state.anchor_texts = {c: list(v) for c, v in defaults.items()}
    return st.session_state.get("anchor_texts", {})


def set_anchor_texts(texts: dict[str, list[str]]) -> None:
    st.session_state.anchor_texts = {c: list(v) for c, v in texts.items()}
    st.session_state.anchor_rev = st.session_state.get("anchor_rev", 0) + 1


def anchor_rev() -> int:
    """Bumped whenever the texts are replaced wholesale (widgets re-read them)."""
    return st.session_state.get("anchor_rev", 0)


def encoder_choice() -> str:
    return _ss("encoder", lambda: os.environ.get("STRUCTGUARD_ENCODER", "auto"))


# ------------------------------------------------------------------ runs


def current_run() -> Path | None:
    """The run shown on the audit page for this session."""
    return st.session_state.get("current_run")


def set_current_run(run_dir: Path | str | None) -> None:
    st.session_state.current_run = Path(run_dir) if run_dir else None


def compare_runs() -> list[str]:
    return _ss("compare_runs", list)


def request_compare(run_ids: list[str]) -> None:
    """Pre-select runs on the Runs page (a new table widget picks up the selection)."""
    st.session_state.compare_runs = list(run_ids)
    st.session_state.runs_rev = st.session_state.get("runs_rev", 0) + 1


# ------------------------------------------------------------------ messages and widgets


def flash(kind: str, message: str) -> None:
    """Queue a message for the next script run (survives st.rerun)."""
    _ss("flash", list).append((kind, message))


def notice(kind: str, message: str) -> None:
    """A message about the session itself (its link, a share link), shown once above the next page."""
    st.session_state.session_notice = (kind, message)


def show_notice() -> None:
    if item := st.session_state.pop("session_notice", None):
        getattr(st, item[0])(item[1])


def show_flash() -> None:
    for kind, message in st.session_state.pop("flash", []):
        getattr(st, kind)(message)


KEPT = "_kept_widget_values"  # keyed widgets kept across pages -> their last values, under a key no widget owns


def widget_defaults(**defaults: Any) -> None:
    """Set first values of keyed widgets and keep them across page switches (keep_widgets).

    Widgets using these keys must not pass `value=`.
    """
    kept = st.session_state.setdefault(KEPT, {})
    for k, v in defaults.items():
        kept[k] = st.session_state[k] = st.session_state[k] if k in st.session_state else kept.get(k, v)


def keep_widgets() -> None:
    """Called by app.py on every run, whatever the page: Streamlit deletes the state of a widget that a run
    did not draw (so a value set on Unlearn was gone after a visit to Audit); re-assigning it keeps it.
    The copy in KEPT brings it back where Streamlit dropped it anyway (after a fragment's run on another
    page, seen in bench/dashboard_runs.py)."""
    kept = st.session_state.get(KEPT, {})
    for k in kept:
        if k in st.session_state:
            kept[k] = st.session_state[k] = st.session_state[k]
        else:
            st.session_state[k] = kept[k]

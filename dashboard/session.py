"""Per-session state of the dashboard, behind a few small helpers.

Everything here lives in `st.session_state`, so two browser sessions never see each
other's work: the forget selection, uploads, anchor texts and encoder, the current run,
the runs picked for comparison, this session's runs, queued messages, and the session's
token (mirrored in the URL as `?s=<token>` so that a reload finds its background job again).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st


def _ss(key: str, factory: Any) -> Any:
    if key not in st.session_state:
        st.session_state[key] = factory()
    return st.session_state[key]


# ------------------------------------------------------------------ identity


def session_token() -> str:
    """Random per-session token, mirrored in the URL (?s=...) so a reload finds its run again."""
    if "token" not in st.session_state:
        given = st.query_params.get("s")
        st.session_state.token = given if given and len(given) == 16 else secrets.token_hex(8)
    if st.query_params.get("s") != st.session_state.token:
        st.query_params["s"] = st.session_state.token
    return st.session_state.token


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


def my_runs() -> list[str]:
    """Run ids created by this session (for marking them on the Runs page)."""
    return _ss("my_runs", list)


# ------------------------------------------------------------------ messages and widgets


def flash(kind: str, message: str) -> None:
    """Queue a message for the next script run (survives st.rerun)."""
    _ss("flash", list).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop("flash", []):
        getattr(st, kind)(message)


def widget_defaults(**defaults: Any) -> None:
    """Set first values of keyed widgets and keep them across page switches.

    Streamlit drops the state of widgets that were not rendered in the last run;
    re-assigning the value keeps it. Widgets using these keys must not pass `value=`.
    """
    for k, v in defaults.items():
        st.session_state[k] = st.session_state[k] if k in st.session_state else v

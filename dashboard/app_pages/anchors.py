"""Anchors: edit each class's attributes, choose the encoder, watch the anchor similarities change."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from core import anchors_llm as LLM
from core.anchors import AnchorError, build_anchor_set, load_anchor_texts, validate_anchor_texts
from core.audit.affinity import anchor_similarity
from core.figures import anchor_similarity_heatmap
from dashboard import resources as R
from dashboard import session as S

st.title("Anchors")
st.caption("Each class's visual attributes are joined into one description (\"a1; a2; ...\") and encoded into a "
           "text embedding: the class's semantic anchor. StructGuard keeps the proxy samples' affinities to these "
           "anchors as they were before unlearning.")

ds = R.get_dataset()
classes = ds.class_names


@st.cache_data(show_spinner=False)
def _defaults(dataset: str, class_names: tuple[str, ...]) -> dict[str, list[str]]:
    return load_anchor_texts(dataset, list(class_names))


try:
    defaults = _defaults(ds.name, tuple(classes))
except AnchorError as exc:
    st.error(f"The default anchors could not be loaded: {exc}")
    defaults = {c: [c] for c in classes}

texts = S.anchor_texts(defaults)
rev = S.anchor_rev()


def _edit(cls: str, key: str) -> None:
    lines = [ln.strip() for ln in st.session_state[key].splitlines()]
    texts[cls] = [ln for ln in lines if ln]
    st.session_state.anchors_edited = texts != defaults


# ---------------------------------------------------------------- encoder
choices = dict(R.encoder_choices())
choices.setdefault(S.encoder_choice(), "available: chosen by STRUCTGUARD_ENCODER")
names = list(choices)
S.widget_defaults(anc_live=True)
c1, c2, c3 = st.columns([2, 1, 1])
enc_name = c1.selectbox("Text encoder", names, index=names.index(S.encoder_choice())
                        if S.encoder_choice() in names else 0,
                        format_func=lambda n: f"{n} — {choices[n].split(':')[0]}", key=f"anc_enc_{rev}",
                        help="\n\n".join(f"**{n}**: {d}" for n, d in choices.items()))
st.session_state.encoder = enc_name
live = c2.toggle("Live update", key="anc_live", help="Re-encode whenever a description changes.")
reencode = c3.button("Re-encode now", icon=":material/refresh:", disabled=live)
if choices.get(enc_name, "").startswith("unavailable"):
    st.warning(f"`{enc_name}` is {choices[enc_name]}")

# ---------------------------------------------------------------- language model


def _md(text: str) -> str:
    """Text shown literally in markdown (an attribute may hold *, _, [, :, $ ...)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|:~$<>])", r"\\\1", text)


def _generate(only: list[str], base_url: str, model: str, n: int) -> None:
    """Ask the model for the classes in `only`; the result waits in `llm_pending` until accepted or discarded."""
    try:
        config = LLM.LLMConfig.from_env(base_url, model)
        try:
            budget, budget_name = LLM.budget_for(R.get_encoder(enc_name))
        except Exception:  # the encoder is unavailable (the page says so below): CLIP's limit, the tightest
            budget, budget_name = LLM.budget_for()
        what = only[0] if len(only) == 1 else f"{len(only)} classes"
        with st.spinner(f"Asking {config.model} at {config.host} for {what} ..."):
            bar = st.progress(0.0, text=f"0 of {len(only)} classes") if len(only) > 1 else None
            done: list[str] = []

            def on_class(cls: str, attrs: list[str]) -> None:
                done.append(cls)
                if bar is not None:
                    bar.progress(len(done) / len(only), text=f"{len(done)} of {len(only)} classes: {cls}")

            result = LLM.generate_anchors(classes, config, dataset=ds.name, n_attributes=n, only=only,
                                          budget=budget, budget_name=budget_name, on_class=on_class)
            if bar is not None:
                bar.empty()
    except (LLM.LLMError, AnchorError) as exc:
        st.session_state.llm_used = True
        st.error(str(exc), icon=":material/error:")
        return
    st.session_state.llm_used = True
    pending = st.session_state.get("llm_pending") or {"texts": {}, "notes": {}}
    pending["texts"].update(result.texts)
    for cls in result.texts:
        pending["notes"][cls] = result.notes.get(cls, [])
    pending["meta"] = result.meta
    st.session_state.llm_pending = pending


def _accept(accepted: list[str]) -> None:
    pending = st.session_state.llm_pending
    new = {c: list(pending["texts"][c]) if c in accepted else list(texts.get(c, [])) for c in classes}
    S.set_anchor_texts(new)
    st.session_state.anchors_edited = new != defaults
    for c in accepted:
        pending["texts"].pop(c, None)
        pending["notes"].pop(c, None)
    if not pending["texts"]:
        st.session_state.pop("llm_pending")
    S.flash("success", f"Accepted the model's attributes for {', '.join(accepted)}; they are ordinary anchors now "
                       "and can be edited below.")
    st.rerun()


def _diff(cls: str, i: int, new: list[str], notes: list[str]) -> None:
    cur = texts.get(cls, [])
    same = cur == new
    st.markdown(f"**{_md(cls)}**" + (" · :gray[same as now]" if same else ""))
    a, b, c = st.columns([5, 5, 2])
    a.caption("Now")
    a.markdown("\n".join(f"- {_md(x)}" if x in new else f"- :red-badge[dropped] ~~{_md(x)}~~" for x in cur)
               or "(none)")
    b.caption("Generated")
    b.markdown("\n".join(f"- {_md(x)}" if x in cur else f"- :green-badge[new] {_md(x)}" for x in new))
    if c.button("Accept this class", key=f"llm_acc_{i}", icon=":material/check:"):
        _accept([cls])
    for note in notes:
        st.caption(f"Note: {note}")


S.widget_defaults(llm_base_url=os.environ.get(LLM.BASE_URL_ENV, ""), llm_model=os.environ.get(LLM.MODEL_ENV, ""),
                  llm_n=LLM.DEFAULT_ATTRIBUTES)
S.show_flash()
# Open once used: an `expanded` that changes between runs would fold the panel away after Accept or Discard.
with st.expander("Generate with a language model", icon=":material/auto_awesome:",
                 expanded=bool(st.session_state.get("llm_pending") or st.session_state.get("llm_used"))):
    has_key = bool(os.environ.get(LLM.KEY_ENV, "").strip())
    base_url, model = st.session_state.llm_base_url.strip(), st.session_state.llm_model.strip()
    if not base_url and not has_key:
        st.info(f"No language-model endpoint is configured. To use one, {LLM.HOW_TO_CONFIGURE} (before starting "
                "the dashboard), or type an endpoint and a model here. Any OpenAI-compatible server works: a hosted "
                "API, or a local one such as Ollama, vLLM or llama.cpp's server.", icon=":material/info:")
    f1, f2, f3 = st.columns([3, 2, 1])
    f1.text_input("Endpoint (OpenAI-compatible base URL)", key="llm_base_url",
                  placeholder="http://localhost:11434/v1" + ("" if not has_key else f" (empty: {LLM.OPENAI_URL})"))
    f2.text_input("Model", key="llm_model", placeholder="e.g. llama3.2 or gpt-4o-mini")
    f3.number_input("Attributes", min_value=1, max_value=30, step=1, key="llm_n")
    st.caption(f"Sent: the class names and the dataset's name, never images. API key: "
               f"{'from ' + LLM.KEY_ENV if has_key else 'none (' + LLM.KEY_ENV + ' is not set)'}, never stored. "
               "Generated attributes are shown against the current ones before anything changes.")
    ready = bool((base_url or has_key) and model)
    st.caption("Ask for one class, or for all of them:")
    grid = st.columns(5)
    asked: list[str] | None = None
    for i, cls in enumerate(classes):
        if grid[i % 5].button(cls, key=f"llm_one_{i}", disabled=not ready, width="stretch"):
            asked = [cls]
    if st.button("All classes", key="llm_all", icon=":material/auto_awesome:", type="primary", disabled=not ready):
        asked = list(classes)
    if asked:
        _generate(asked, base_url, model, int(st.session_state.llm_n))

    pending = st.session_state.get("llm_pending")
    if pending and pending["texts"]:
        meta = pending.get("meta", {})
        st.subheader("Generated attributes: compare, then accept or discard")
        st.caption(f"From {meta.get('model')} at {meta.get('endpoint')} (prompt v{meta.get('prompt_version')}, "
                   f"{meta.get('time')}); each description cut to fit {meta.get('token_budget')}.")
        p1, p2, _ = st.columns([1, 1, 4])
        if p1.button("Accept", key="llm_accept", icon=":material/done_all:", type="primary"):
            _accept([c for c in classes if c in pending["texts"]])
        if p2.button("Discard", key="llm_discard", icon=":material/close:"):
            st.session_state.pop("llm_pending")
            st.rerun()
        for i, cls in enumerate(classes):
            if cls in pending["texts"]:
                _diff(cls, i, pending["texts"][cls], pending["notes"].get(cls, []))

# ---------------------------------------------------------------- editors
left, right = st.columns([3, 2])
with left:
    st.subheader("Attributes per class")
    st.caption("One attribute per line. Changes apply to this session's next runs.")
    cols = st.columns(2)
    for i, cls in enumerate(classes):
        key = f"anc_{rev}_{i}"
        with cols[i % 2]:
            changed = texts.get(cls) != defaults.get(cls)
            st.text_area(f"{cls}{' (edited)' if changed else ''}", "\n".join(texts.get(cls, [])), key=key,
                         height=150, on_change=_edit, args=(cls, key))
    b1, b2, b3 = st.columns(3)
    if b1.button("Restore defaults", icon=":material/restart_alt:", disabled=texts == defaults):
        S.set_anchor_texts(defaults)
        st.session_state.anchors_edited = False
        st.rerun()
    b2.download_button("Export JSON", json.dumps({"dataset": ds.name, "classes": texts}, indent=2, ensure_ascii=False),
                       file_name=f"anchors-{ds.name}.json", mime="application/json", icon=":material/download:")
    with b3.popover("Import JSON", icon=":material/upload:"):
        up = st.file_uploader("Anchor file", type=["json"], key=f"anc_import_{rev}")
        if up is not None and st.button("Use this file"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "anchors.json"
                path.write_bytes(up.getvalue())
                try:
                    meta = json.loads(up.getvalue().decode("utf-8"))
                    if isinstance(meta, dict) and meta.get("dataset") not in (None, ds.name):
                        raise AnchorError(f"the file is for dataset {meta.get('dataset')!r}, not {ds.name!r}")
                    loaded = load_anchor_texts(path, classes)
                except (AnchorError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    why = str(exc).replace(f"anchor file {path}: ", "").replace(str(path), up.name)
                    st.error(f"{up.name} does not fit {ds.name}: {why}")
                else:
                    S.set_anchor_texts(loaded)
                    st.session_state.anchors_edited = loaded != defaults
                    st.rerun()

# ---------------------------------------------------------------- encode + heatmap
with right:
    st.subheader("Anchor similarity")
    anchor_set, problem = st.session_state.get("anchor_set"), None
    wanted = (json.dumps(texts, sort_keys=True), enc_name)
    if live or reencode or anchor_set is None:
        try:
            validate_anchor_texts(texts, classes)
            with st.spinner(f"Encoding with {enc_name} ..."):
                anchor_set = build_anchor_set(texts, classes, R.get_encoder(enc_name), ds.name)
            st.session_state.anchor_set, st.session_state.anchor_set_key = anchor_set, wanted
        except Exception as exc:  # AnchorError (bad text) or EncoderError (missing weights)
            problem = str(exc)
    if problem:
        st.error(problem)
    if anchor_set is not None:
        stale = st.session_state.get("anchor_set_key") != wanted
        st.caption(f"Encoder in use: **{anchor_set.encoder}** · {anchor_set.matrix.shape[1]}-d · "
                   f"hash `{anchor_set.hash[:12]}`" + (" · **stale: press Re-encode**" if stale else ""))
        sim = anchor_similarity(anchor_set.matrix.numpy())
        st.plotly_chart(anchor_similarity_heatmap(sim, anchor_set.class_names, title="Cosine between class anchors"),
                        key="anc_heat")
        for w in anchor_set.warnings:
            st.warning(w, icon=":material/warning:")

    st.subheader("Difference from the defaults")
    rows = []
    for cls in classes:
        cur, base = texts.get(cls, []), defaults.get(cls, [])
        added = [a for a in cur if a not in base]
        removed = [a for a in base if a not in cur]
        if added or removed:
            rows.append({"class": cls, "added": "; ".join(added), "removed": "; ".join(removed)})
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    else:
        st.caption("No changes: the default descriptions are in use.")

"""Runs: the runs this session may see (damaged ones marked), side-by-side comparison, delete, lineage, continue."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import runs as core_runs
from dashboard import resources as R
from dashboard import session as S
from dashboard import widgets

st.title("Runs")
root = core_runs.runs_root()
infos = core_runs.visible_runs(root, S.owner_secret(), S.grants())
st.caption("This session's runs, and read-only runs: those made from the command line (CLI) and those another "
           "session shared with this one by link. Other sessions' runs are not listed. A run is written to a "
           "hidden folder and renamed when complete, so an interrupted run never shows up as complete; a run "
           "folder that is not complete (a file missing or unreadable, no metrics) is listed as damaged, with the "
           "reason.")
for item in core_runs.interrupted_runs(root, S.owner_secret()):
    left, right = st.columns([6, 1])
    left.warning(item.describe())
    if right.button("Dismiss", key=f"dismiss-{item.path.name}"):
        core_runs.dismiss_interrupted(item)
        st.rerun()
if not infos:
    st.info("No runs yet. Start one on the Unlearn page, or run the teaching demo on the Start page.")
    st.stop()


def _metric(meta: dict | None, when: str, name: str) -> float | None:
    try:
        return (meta or {})["metrics"][when][name]
    except (KeyError, TypeError):
        return None


rows = []
for info in infos:
    m = info.meta or {}
    rows.append({
        "run": info.run_id,
        "origin": info.origin_label,
        "status": "complete" if info.ok else f"damaged: {core_runs.redact_paths(info.error)}",
        "method": m.get("method"),
        "k": m.get("k", len(m.get("forget_ids", []) or [])),
        "seed": m.get("seed"),
        "forget acc after": _metric(m, "after", "forget_acc"),
        "test acc before": _metric(m, "before", "test_acc"),
        "test acc after": _metric(m, "after", "test_acc"),
        "structure (affinity cos)": ((_metric(m, "after", "structure") or {}).get("affinity_cosine")),
        "parent": m.get("parent_run"),
        "created": m.get("created"),
    })
df = pd.DataFrame(rows)
wanted = [i for i, r in enumerate(rows) if r["run"] in S.compare_runs()]
event = st.dataframe(
    df, hide_index=True, on_select="rerun", selection_mode="multi-row",
    key=f"runs_table_{st.session_state.get('runs_rev', 0)}",
    selection_default={"selection": {"rows": wanted}} if wanted else None,
    column_config={"forget acc after": st.column_config.NumberColumn(format="%.1f"),
                   "test acc before": st.column_config.NumberColumn(format="%.2f"),
                   "test acc after": st.column_config.NumberColumn(format="%.2f"),
                   "structure (affinity cos)": st.column_config.NumberColumn(format="%.3f")})
picked = [infos[i] for i in event.selection.rows] if event is not None else []
st.session_state.compare_runs = [p.run_id for p in picked]

if not picked:
    st.caption("Select one run to open, continue or delete it; select two or more to compare them.")
    st.stop()

ok = [p for p in picked if p.ok]
c1, c2, c3 = st.columns(3)
if len(picked) == 1 and ok:
    if c1.button("Open in Audit", icon=":material/fact_check:", type="primary"):
        S.set_current_run(ok[0].path)
        st.switch_page("app_pages/audit.py")
    if c2.button("Continue from this run", icon=":material/redo:",
                 help="A sequential request: the next run starts from this run's unlearned model."):
        st.session_state.continue_from = str(ok[0].path)
        already = set((ok[0].meta or {}).get("all_forget_ids", (ok[0].meta or {}).get("forget_ids", [])))
        S.set_selection(S.selection() - already)
        st.switch_page("app_pages/unlearn.py")
read_only = [p.run_id for p in picked if not p.own]
with c3.popover(f"Delete {len(picked)} run(s)", icon=":material/delete:", disabled=widgets.busy() or bool(read_only),
                help=f"Read-only here (not this session's): {', '.join(read_only)}" if read_only else None):
    st.write("This removes the run folders from disk: " + ", ".join(f"`{p.run_id}`" for p in picked))
    if st.button("Delete for good", type="primary"):
        errors, gone = [], set()
        for p in picked:
            try:
                core_runs.delete_own_run(p.path, S.owner_secret(), root)  # refuses a run this session does not own
                gone.add(p.path)
            except FileNotFoundError:
                errors.append(f"`{p.run_id}` was already deleted (outside the dashboard, or on an earlier page).")
                gone.add(p.path)
            except (core_runs.RunError, OSError) as exc:
                errors.append(f"`{p.run_id}` could not be deleted: {core_runs.redact_paths(str(exc))}")
        if S.current_run() in gone:
            S.set_current_run(None)
        S.request_compare([])
        for e in errors:
            st.error(e)
        if not errors:
            st.rerun()
if read_only:
    st.caption("Read-only here: " + ", ".join(f"`{r}`" for r in read_only) + ". Only the session that made a run "
               "can delete or share it; runs from the command line are removed on the server, not here.")

# ---------------------------------------------------------------- lineage
if len(picked) == 1:
    chain = core_runs.lineage(picked[0].path, visible={i.run_id for i in infos})
    if len(chain) > 1:
        st.subheader("Lineage")
        dot = ["digraph { rankdir=LR; node [shape=box, style=rounded, fontsize=10];"]
        for a, b in zip(chain, chain[1:], strict=False):
            dot.append(f'"{a.get("run_id")}" -> "{b.get("run_id")}";')
        dot.append("}")
        st.graphviz_chart("\n".join(dot))
        st.dataframe(pd.DataFrame([{"run": c.get("run_id"), "method": c.get("method"),
                                    "forgets": len(c.get("forget_ids", []) or []),
                                    "test acc after": _metric(c, "after", "test_acc")} for c in chain]),
                     hide_index=True)
    else:
        st.caption("This run started from the original model (no earlier requests in its lineage).")

# ---------------------------------------------------------------- comparison
if len(ok) >= 2:
    st.subheader(f"Comparison of {len(ok)} runs")
    records = {}
    for p in ok:
        try:
            rec = R.load_run(p.path)
        except (core_runs.RunError, OSError):  # deleted or damaged since the table was drawn
            rec = None
        if rec is None or core_runs.meta_problem(rec.meta):
            st.warning(f"`{p.run_id}` is left out of the comparison: it was deleted or damaged just now.")
            continue
        records[p.run_id] = rec
    if not records:
        st.stop()
    table = {}
    for rid, rec in records.items():
        b, a = rec.meta["metrics"]["before"], rec.meta["metrics"]["after"]
        table[rid] = {"method": rec.meta["method"], "forget acc before": b["forget_acc"], "forget acc after":
                      a["forget_acc"], "retain acc after": a["retain_acc"], "test acc before": b["test_acc"],
                      "test acc after": a["test_acc"], **{f"structure: {k}": v for k, v in
                                                         (a.get("structure") or {}).items()},
                      "dim alignment after": a.get("dim_alignment"), "steps": rec.meta.get("steps"),
                      "time (s)": (rec.meta.get("timings") or {}).get("total")}
    frame = pd.DataFrame.from_dict(table, orient="index").round(3)  # one row per run: one type per column
    st.dataframe(frame, width="stretch")
    accs = frame[["forget acc after", "retain acc after", "test acc after"]].astype(float)
    st.bar_chart(accs, stack=False, height=260, y_label="accuracy (%)")
    st.markdown("**Embedding drift**")
    cols = st.columns(min(len(records), 3))
    for i, (rid, rec) in enumerate(records.items()):
        with cols[i % len(cols)]:
            st.caption(f"{rec.meta['method']} · `{rid}`")
            widgets.drift_figure(rec, key=f"cmp_drift_{rid}")

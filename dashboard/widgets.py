"""UI pieces shared by several pages: starting runs in the background and the live job panel."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import streamlit as st

from core.runs import owner_hash, runs_root
from dashboard import jobs
from dashboard import resources as R
from dashboard import session as S

DEMO_K = 8
DEMO_SEED = 0
# Small enough for a laptop CPU in about a minute (DESIGN.md §1, teachers).
DEMO_OVERRIDES: dict[str, Any] = {}  # the engine's own defaults for k=8 (tuned on held-out data)
DEMO_RETAIN_EVAL = 2000  # retain accuracy on a fixed subset of this size (the test set is always full)


def make_request(**fields: Any) -> Any:
    """A core.pipeline.RunRequest from keyword fields (None values left to core's defaults), owned by this
    session: the run records the hash of its owner secret."""
    from core.pipeline import RunRequest

    fields.setdefault("owner", owner_hash(S.owner_secret()))

    known = {f.name for f in dataclasses.fields(RunRequest)}
    unknown = {k for k, v in fields.items() if k not in known and v is not None}
    if unknown:
        raise ValueError(f"RunRequest has no field(s) {', '.join(sorted(unknown))}")
    return RunRequest(**{k: v for k, v in fields.items() if k in known and v is not None})


def launch(label: str, requests: list[Any], open_page: str) -> None:
    """Run the requests one after another in this session's worker process (dashboard.worker), which
    also prepares each new run's audit views. The requests are resolved here, in the script thread."""
    R.warm_up_drift()  # starts UMAP's one-time compile for the Audit page, in its own thread
    st.session_state.job_open_page = open_page
    jobs.start_job(label, requests)


def busy() -> bool:
    job = jobs.current_job()
    return job is not None and job.status == "running"


def live_charts(history: list[dict], key: str) -> None:
    """Loss terms and forget accuracy per update step (core.figures.history_curves), one chart per run."""
    if len([h for h in history if h.get("step")]) == 0:
        st.caption("Curves appear with the first update step.")
        return
    from core.figures import history_curves

    tags = list(dict.fromkeys(h.get("run", "") for h in history))
    for tag in tags:
        rows = [h for h in history if h.get("run", "") == tag]
        st.plotly_chart(history_curves(rows, title=f"Live: {tag}" if tag else "Live curves"), key=f"{key}_{tag}")


def job_panel(key: str) -> None:
    """Progress, live curves and a cancel button for this session's job; polls while it runs."""
    job = jobs.current_job()
    if job is None:
        return
    running = job.status == "running"

    @st.fragment(run_every=1.0 if running else None)
    def panel() -> None:
        snap = job.snapshot()
        if st.session_state.pop("reattached", False) and snap["status"] == "running":
            st.info("The page was reloaded while this run was going: it kept running and is shown again here.")
        st.markdown(f"**{snap['label']}** — {snap['status']} ({snap['elapsed']:.0f} s)")
        st.progress(snap["fraction"], text=snap["message"])
        if snap["status"] == "running":
            if st.button("Cancel", key=f"{key}_cancel", icon=":material/stop_circle:"):
                job.cancel_event.set()
                st.toast("Cancelling after the current step ...")
        live_charts(snap["history"], key=f"{key}_chart")
        if snap["status"] != "running" and running:
            st.rerun()  # stop polling; the app records the outcome and opens the follow-up page

    panel()
    finish_job(job)  # also done from the sidebar; here too because AppTest re-runs only the page
    snap = job.snapshot()
    if snap["status"] == "done" and snap["run_dirs"]:
        st.success("Saved: " + ", ".join(f"`{d.name}`" for d in snap["run_dirs"]))
        if st.button("Open in Audit", key=f"{key}_open", icon=":material/fact_check:"):
            S.set_current_run(snap["run_dirs"][-1])
            st.switch_page("app_pages/audit.py")
    elif snap["status"] == "cancelled":
        st.warning("The run was cancelled. Nothing was saved for the unfinished run; earlier saved runs are intact.")
    elif snap["status"] == "failed":
        st.error(f"The run failed: {snap['error']}")


SHOWN_PAGE = "_shown_page"  # the page of the last full run (a StreamlitPage), set by app.py


def sidebar_job() -> None:
    """A small progress line on every page while this session's job runs; records the outcome once it ends.

    Its timer also keeps the browser on the page the server last ran (recover_stale_page), while the job
    runs and until jobs.SETTLE_S after its follow-up page opened."""
    job = jobs.current_job()
    if job is None:
        return
    running = job.status == "running"
    polling = job.settling()

    @st.fragment(run_every=1.0 if polling else None)
    def mini() -> None:
        recover_stale_page()
        snap = job.snapshot()
        if snap["status"] == "running":
            st.progress(snap["fraction"], text=f"**{snap['label']}**  \n{snap['message']}")
        elif running or (polling and not job.settling()):  # as of the full run that drew it: a timer's run
            st.rerun()  # record the outcome and open the follow-up page, or stop polling

    mini()
    finish_job(job)


def recover_stale_page() -> None:
    """In a fragment run: if its request came from another page than the last full run's, open that page.

    A fragment timer's request carries the page the browser was on when it fired. Handled after a page
    switch (the follow-up page of a finished job, or a click), Streamlit tells the browser it is on the old
    page again, and the browser drops the new page's elements: an empty main area that stays until the
    next click (seen in bench/dashboard_runs.py, about 1 in 15 runs). Running the shown page again mends it."""
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    ctx, shown = get_script_run_ctx(), st.session_state.get(SHOWN_PAGE)
    if ctx is not None and shown is not None and ctx.page_script_hash != shown._script_hash:
        st.switch_page(shown)


def finish_job(job: jobs.Job) -> None:
    """Once per finished job: show its last run and open the follow-up page (page_done ends it).

    Streamlit merges pending reruns and keeps the page of the newest one, so a fragment's timer on the page
    the user was on can undo the switch, before or during the follow-up page's run (seen in about 1 of 20
    runs in a browser): until a run of the follow-up page has finished, a run elsewhere switches again."""
    snap = job.snapshot()
    if snap["status"] != "done" or not snap["run_dirs"] or job.handled:
        return
    target = follow_up_page()
    if on_page(target):
        return
    ids = [d.name for d in snap["run_dirs"]]
    S.set_current_run(snap["run_dirs"][-1])
    if len(ids) > 1:
        S.request_compare(ids)
    st.switch_page(target)


def page_done() -> None:
    """Called by app.py when a page's run has finished (also by st.stop(), not when a rerun cut it short):
    the finished job's follow-up page has been shown."""
    job = jobs.current_job()
    if job is None or job.handled or job.status != "done":
        return
    if on_page(follow_up_page()):
        job.handled, job.handled_at = True, time.time()
        st.session_state.pop("job_open_page", None)


def follow_up_page() -> str:
    """The page a finished job opens, as "app_pages/<file>"."""
    return st.session_state.get("job_open_page", "app_pages/audit.py")


def on_page(path: str) -> bool:
    """Whether the last full run (app.py's SHOWN_PAGE) was the page given as "app_pages/<file>" (PAGES)."""
    shown = st.session_state.get(SHOWN_PAGE)
    url = next((url for file, _, _, url in PAGES if path.endswith(file)), None)
    return shown is not None and shown.url_path == url


def demo_launcher(model_name: str | None, ds: Any) -> None:
    """The teaching demo button (NegGrad vs StructGuard on the same small forget set)."""
    if model_name is None or ds is None:
        st.button("Run the teaching demo", disabled=True, help="Needs a model and a dataset.")
        return
    try:
        import core.pipeline  # noqa: F401
    except ImportError:
        st.info("The engine (core.pipeline) is not installed yet.")
        return
    tip = f"k={DEMO_K} random training images (seed {DEMO_SEED}), each method with its k={DEMO_K} defaults."
    if st.button("Run the teaching demo", type="primary", icon=":material/play_arrow:", disabled=busy(), help=tip):
        rng = np.random.default_rng(DEMO_SEED)
        ids = sorted(int(i) for i in rng.choice(ds.train.ids.numpy(), DEMO_K, replace=False))
        S.set_selection(ids)
        reqs = [make_request(model=model_name, dataset=ds.name, forget_ids=ids, method=m, config=DEMO_OVERRIDES,
                             seed=DEMO_SEED, runs_root=str(runs_root()), retain_eval=DEMO_RETAIN_EVAL,
                             **anchor_fields())
                for m in ("neggrad", "structguard")]
        launch("Teaching demo: NegGrad vs StructGuard", reqs, "app_pages/runs.py")
        st.rerun()
    job_panel("start")


def anchor_fields() -> dict[str, Any]:
    """The session's anchor texts and encoder, as RunRequest fields."""
    texts = S.anchor_texts()
    return {"anchor_texts": texts or None, "encoder": S.encoder_choice()}


def drift_figure(rec: Any, key: str) -> None:
    """The drift scatter of a loaded run (core.audit.views, cached per run), or a note when it cannot be drawn."""
    if "feats_before" not in rec.audit:
        st.caption("No audit features in this run.")
        return
    from core.figures import drift_scatter

    result = R.drift_view(rec.path).result
    st.plotly_chart(drift_scatter(result.before, result.after, result.labels, result.groups,
                                  R.class_names(rec.meta), method=result.method), key=key)


def share_link(run_id: str, key: str) -> str:
    """The address that opens one run's Audit view read-only: this app's address, its audit page, the key."""
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(st.context.url or "")
    path = parts.path.rstrip("/")
    if path.rsplit("/", 1)[-1] in PAGE_PATHS:  # the page this session is on; the link names the audit page
        path = path.rsplit("/", 1)[0]
    base = f"{parts.scheme}://{parts.netloc}{path}" if parts.netloc else path
    return f"{base}/audit?{urlencode({'run': run_id, 'key': key})}"


# The app's pages (file under app_pages/, title, icon, url_path; the first is the default page at "/").
# app.py builds the navigation from this table; share_link reads the url_paths from it.
PAGES = (("start.py", "Start", ":material/home:", ""),
         ("forget_set.py", "Forget set", ":material/photo_library:", "forget"),
         ("anchors.py", "Anchors", ":material/anchor:", "anchors"),
         ("unlearn.py", "Unlearn", ":material/model_training:", "unlearn"),
         ("audit.py", "Audit", ":material/fact_check:", "audit"),
         ("runs.py", "Runs", ":material/history:", "runs"))
PAGE_PATHS = tuple(url for *_, url in PAGES if url)


def share_panel(info: Any) -> None:
    """Share one of this session's runs by link, show the link again, or stop sharing it (core.runs)."""
    from core import runs as core_runs

    with st.popover("Share this run", icon=":material/share:"):
        st.caption("Anyone with the link can open this run's Audit view and download its files; nobody but this "
                   "session can delete it. Stopping ends every link at once.")
        try:
            if info.shared:
                key = core_runs.share_key(S.owner_secret(), info.run_id)
                st.code(share_link(info.run_id, key), language=None, wrap_lines=True)
                if st.button("Stop sharing", key="share_stop"):
                    core_runs.unshare_run(info.path, S.owner_secret())
                    st.rerun()
            elif st.button("Make a share link", key="share_make", type="primary"):
                core_runs.share_run(info.path, S.owner_secret())
                st.rerun()
        except (core_runs.RunError, OSError) as exc:  # read-only disk, the run deleted meanwhile
            st.error(f"Could not change sharing: {core_runs.redact_paths(str(exc))}")

"""StructGuard Studio: `streamlit run dashboard/app.py`.

The entry point only sets up the page, the navigation and a short sidebar;
each page is a thin file under dashboard/app_pages/ (not pages/: Streamlit would list a pages/ folder
itself and serve a page opened by its URL without this script, hence without the navigation).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# open_clip would otherwise retry downloads for ~46 s when weights are missing (DESIGN.md §4).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import streamlit as st  # noqa: E402
from streamlit.runtime.scriptrunner_utils.exceptions import StopException  # noqa: E402

from core.runs import clean_partials_once, runs_root  # noqa: E402
from dashboard import resources as R  # noqa: E402
from dashboard import session as S  # noqa: E402
from dashboard import widgets  # noqa: E402

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="StructGuard Studio", page_icon=":material/shield:", layout="wide")
S.session_token()
S.keep_widgets()
clean_partials_once(runs_root())  # folders of killed runs; once per process, though this script re-runs
R.run_workers_started()  # unless STRUCTGUARD_WORKER_PROCESS=0: the preloaded fork server of the run workers

nav = st.navigation([st.Page(PAGES / file, title=title, icon=icon, url_path=url or None, default=not url)
                     for file, title, icon, url in widgets.PAGES])
if S.accept_share_link() and nav.url_path != "audit":  # a share link opens its run's Audit view
    st.switch_page(PAGES / "audit.py")
S.show_notice()
st.session_state[widgets.SHOWN_PAGE] = nav  # finish_job knows when its switch has arrived; recover_stale_page

with st.sidebar:
    st.caption("This session")
    n_up = len(S.uploads())
    st.markdown(f"**Forget set:** {len(S.selection())} images" + (f" + {n_up} uploaded" if n_up else ""))
    widgets.sidebar_job()
    run = S.current_run()
    if run is not None:
        st.markdown(f"**Current run:** `{run.name}`")

try:
    nav.run()
except StopException:  # st.stop(): the page ended early, but it ended
    widgets.page_done()
    raise
widgets.page_done()

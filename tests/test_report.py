"""core.report on a real (small) NegGrad run of the engine, and on damaged variants of it.

The browser tests open the written HTML in headless Chromium (Playwright driving
/usr/bin/chromium, never a downloaded browser) with the network blocked, and check
that every plot rendered.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_fashion_idx

from core.audit.views import returned_step
from core.report import build_report, export_pngs, find_chromium, load_run_tolerant

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
requires_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is not installed "
                                       "(apt-get install chromium); browser checks skipped")


@pytest.fixture(scope="session")
def neggrad_run(sample_model, fashion, tmp_path_factory) -> Path:
    """One real engine run: NegGrad on 4 real training images of a 3,000/1,000-image slice of Fashion-MNIST."""
    pipeline = pytest.importorskip("core.pipeline")
    tmp = tmp_path_factory.mktemp("report")
    data = write_fashion_idx(tmp / "fmnist", fashion, 3000, 1000)  # 1,000 test images keep it light
    ids = [int(i) for i in np.random.default_rng(0).choice(3000, 4, replace=False)]
    req = pipeline.RunRequest(forget_ids=ids, method="neggrad", encoder="clip-random:ViT-S-32",
                              runs_root=str(tmp / "runs"), data_dir=str(data), audit_per_class=8, retain_eval=300,
                              config={"max_epochs": 5})
    return pipeline.execute_run(req)


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _rewrite_audit(run: Path, fn) -> None:
    with np.load(run / "audit.npz", allow_pickle=False) as z:
        audit = {k: z[k] for k in z.files}
    audit = fn(audit)
    (run / "audit.npz").unlink()
    np.savez_compressed(run / "audit.npz", **audit)


def _figures_in(html: str) -> list[str]:
    return re.findall(r'data-figure="([a-z_]+)"', html)


def test_complete_run_report(neggrad_run, tmp_path):
    res = build_report(neggrad_run, tmp_path / "r.html", drift_method="umap")
    html = res.path.read_text()
    figs = _figures_in(html)
    for name in ("per_class_accuracy", "history", "drift", "drift_per_class", "timeline", "anchor_similarity",
                 "affinity", "class_mean_affinity", "row_cosine", "gradcam", "mia"):
        assert name in figs, (name, res.missing)
    assert res.missing == [], res.missing
    meta = json.loads((neggrad_run / "run.json").read_text())
    # metrics with deltas, provenance, anchor texts, MIA definition
    after, before = meta["metrics"]["after"], meta["metrics"]["before"]
    assert f"{after['test_acc']:.2f}" in html and f"{after['test_acc'] - before['test_acc']:+.2f}" in html
    assert meta["model"]["weights_sha256"] in html and meta["anchors"]["hash"] in html
    assert meta["anchors"]["encoder"] in html
    first_class, attrs = next(iter(meta["anchors"]["texts"].items()))
    assert "; ".join(attrs).replace("'", "&#x27;") in html
    assert "Definition" in html and "balanced accuracy" in html
    # self-contained: plotly inline, no external scripts or images
    assert "<script src=" not in html and 'src="http' not in html
    assert html.count("data:image\\u002fpng;base64,") >= 3 * 2  # plotly's JSON escapes "/" as \u002f
    assert len(html) > 3_000_000  # plotly.js itself is inline
    assert "Missing or incomplete" not in html


def test_report_without_snapshots(neggrad_run, tmp_path):
    run = _copy(neggrad_run, tmp_path)
    _rewrite_audit(run, lambda a: {k: v for k, v in a.items() if k not in ("snapshots", "snapshot_steps")})
    res = build_report(run, tmp_path / "r.html", drift_method="pca", gradcam=False)
    figs = _figures_in(res.path.read_text())
    assert "timeline" not in figs and "drift" in figs and "mia" in figs
    assert any("timeline" in m and "no feature snapshots" in m for m in res.missing)


def test_report_of_older_run_recomputes_and_says_what_is_missing(neggrad_run, tmp_path):
    run = _copy(neggrad_run, tmp_path)
    drop = {"backbone_after", "affinity_before", "affinity_after", "retain_conf_before", "retain_conf_after",
            "test_conf_before", "test_conf_after"}
    _rewrite_audit(run, lambda a: {k: v for k, v in a.items() if k not in drop})
    meta = json.loads((run / "run.json").read_text())
    for key in ("history", "anchors", "config"):
        meta.pop(key)
    (run / "run.json").write_text(json.dumps(meta))
    res = build_report(run, tmp_path / "r.html", drift_method="pca", drift_space="backbone", gradcam=False)
    html = res.path.read_text()
    figs = _figures_in(html)
    assert "affinity" in figs and "recomputed" in html  # from feats + R + anchors
    assert "drift" in figs and "no backbone features" in html
    assert "mia" not in figs and "history" not in figs
    text = " | ".join(res.missing)
    assert "membership inference" in text and "training history" in text and "configuration" in text
    assert "Missing or incomplete" in html


def test_report_of_damaged_run(neggrad_run, tmp_path):
    run = _copy(neggrad_run, tmp_path)
    (run / "run.json").write_text((run / "run.json").read_text()[:200])  # truncated JSON
    res = build_report(run, tmp_path / "a.html", drift_method="pca", gradcam=True)
    html = res.path.read_text()
    assert "run.json is damaged" in " ".join(res.missing)
    assert "drift" in _figures_in(html) and "metrics" in " ".join(res.missing)
    # and a truncated audit.npz: metrics survive, array figures are reported missing
    run2 = _copy(neggrad_run, tmp_path, "run2")
    data = (run2 / "audit.npz").read_bytes()
    (run2 / "audit.npz").write_bytes(data[: len(data) // 3])
    meta, audit, problems = load_run_tolerant(run2)
    assert meta["run_id"] and "audit.npz" in " ".join(problems)
    res2 = build_report(run2, tmp_path / "b.html", drift_method="pca", gradcam=False)
    figs = _figures_in(res2.path.read_text())
    assert "per_class_accuracy" in figs and "history" in figs and "drift" not in figs
    assert any("embedding drift" in m for m in res2.missing)
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_report_forget_set_of_one_and_absent_class(neggrad_run, tmp_path):
    run = _copy(neggrad_run, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    absent = 5

    def shrink(a: dict) -> dict:
        g, y = a["group"].astype(str), a["labels"]
        keep = ((g == "forget") & (np.cumsum(g == "forget") == 1)) | ((g != "forget") & (y != absent))
        out = {}
        for k, v in a.items():
            if k == "snapshots":
                out[k] = v[:, keep]
            elif v.ndim >= 1 and len(v) == len(g):
                out[k] = v[keep]
            else:
                out[k] = v
        return out

    _rewrite_audit(run, shrink)
    meta["forget_ids"] = meta["forget_ids"][:1]
    (run / "run.json").write_text(json.dumps(meta))
    res = build_report(run, tmp_path / "r.html", drift_method="umap", n_gradcam=4)
    html = res.path.read_text()
    figs = _figures_in(html)
    for name in ("drift", "timeline", "affinity", "class_mean_affinity", "mia", "gradcam"):
        assert name in figs, (name, res.missing)
    name = meta["anchors"]["class_names"][absent]
    assert f"classes absent from the audit sample (no retained/test samples): {name}" in html
    assert "Fewer than 10 forget samples" in html
    assert "Forget set (1 training ids)" in html


def test_cli_report(neggrad_run, tmp_path, run_cli):
    out = tmp_path / "cli.html"
    proc = run_cli("report", str(neggrad_run), "-o", str(out), "--drift", "pca", "--no-gradcam", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"wrote {out}" in proc.stdout
    bad = run_cli("report", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "not a directory" in bad.stderr


@pytest.mark.browser
@requires_chromium
def test_report_renders_offline_in_chromium(neggrad_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    res = build_report(neggrad_run, tmp_path / "r.html", drift_method="umap")
    expected = len(_figures_in(res.path.read_text()))
    external, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):
                if r.request.url.startswith(("http://", "https://")):
                    external.append(r.request.url)
                    return r.abort()
                return r.continue_()

            page.route("**/*", route)
            page.set_default_timeout(180_000)  # 5 MB of inline JS on a shared 2-core machine
            page.goto(res.path.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}")
            rendered = page.evaluate("""() => [...document.querySelectorAll('.fig')].map(d => {
                const p = d.querySelector('.js-plotly-plot');
                return {name: d.dataset.figure, ok: !!(p && p._fullLayout && p.querySelector('.main-svg')),
                        points: p ? p.querySelectorAll('.point, .bars path, .heatmaplayer image, .imagelayer image,'
                                                       + ' .layer-above image, image').length : 0};
            })""")
            # the timeline animates: drag to the last frame through Plotly and check points moved
            moved = page.evaluate("""async () => {
                const gd = document.getElementById('fig-timeline');
                const xs = () => Array.from(gd._fullData[gd._fullData.length - 1].x);
                const first = xs();
                const names = gd._transitionData._frames.map(f => f.name);
                await Plotly.animate(gd, [names[names.length - 1]], {frame: {duration: 0}, transition: {duration: 0}});
                const last = xs();
                return {frames: names.length, changed: first.some((v, i) => v !== last[i])};
            }""")
        finally:
            browser.close()
    assert not external, external
    assert not errors, errors
    assert len(rendered) == expected and all(r["ok"] for r in rendered), rendered
    assert all(r["points"] > 0 for r in rendered), rendered
    assert moved["frames"] >= 2 and moved["changed"]


@pytest.mark.browser
@requires_chromium
def test_png_export_with_kaleido(tmp_path):
    import plotly.graph_objects as go

    assert find_chromium() is not None
    figs = {"a": go.Figure(go.Bar(x=[1, 2], y=[3, 4])), "b": go.Figure(go.Scatter(x=[1, 2], y=[1, 0]))}
    paths, note = export_pngs(figs, tmp_path / "png")
    assert [p.name for p in paths] == ["a.png", "b.png"], note
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000 for p in paths)


def test_png_export_skipped_without_chromium(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    import core.report as report

    monkeypatch.setattr(report, "find_chromium", lambda: None)
    paths, note = report.export_pngs({"a": go.Figure()}, tmp_path / "png")
    assert paths == [] and "skipped" in note


def test_report_escapes_what_the_run_record_says(neggrad_run, tmp_path):
    """Anchor texts, model names and warnings are user input: the template autoescapes them."""
    run = _copy(neggrad_run, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    evil = "<script>alert('x')</script>"
    first = next(iter(meta["anchors"]["texts"]))
    meta["anchors"]["texts"][first] = [evil]
    meta["anchors"]["warnings"] = [evil]
    meta["model"]["name"] = evil
    (run / "run.json").write_text(json.dumps(meta))
    html = build_report(run, tmp_path / "r.html", drift_method="pca", gradcam=False).path.read_text()
    assert evil not in html
    assert html.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") >= 3  # anchors table, warning, provenance


def test_views_are_cached_beside_the_run_and_follow_its_audit_file(neggrad_run, tmp_path):
    from core.audit.views import drift_view
    from core.runs import load_run

    run = _copy(neggrad_run, tmp_path)
    shutil.rmtree(run / "views", ignore_errors=True)
    rec = load_run(run)
    first = drift_view(run, rec.audit, rec.meta, method="pca")
    cache = run / "views" / "drift-prediction-pca.npz"
    assert cache.is_file()
    stamp = np.load(cache)["stamp"].item()
    again = drift_view(run, rec.audit, rec.meta, method="pca")
    np.testing.assert_array_equal(first.result.after, again.result.after)
    assert first.frames is not None and first.frames.shape[0] == len(first.steps) >= 2
    # a replaced audit file (same run folder) is never drawn from the old cache
    _rewrite_audit(run, lambda a: {**a, "feats_after": a["feats_before"]})
    rec = load_run(run)
    moved = drift_view(run, rec.audit, rec.meta, method="pca")
    assert np.load(cache)["stamp"].item() != stamp
    np.testing.assert_allclose(moved.result.after, moved.result.before, atol=1e-5)


def test_views_of_an_unwritable_run_are_computed_not_cached(neggrad_run, tmp_path):
    """A run folder that cannot take the cache (read-only, full, or as here: views/ is a file) still draws."""
    import warnings

    from core.audit.views import drift_view
    from core.runs import load_run

    run = _copy(neggrad_run, tmp_path)
    shutil.rmtree(run / "views", ignore_errors=True)  # the session's run may hold views other tests cached
    rec = load_run(run)
    (run / "views").write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        view = drift_view(run, rec.audit, rec.meta, method="pca")
    assert view.result.after.shape == (len(rec.audit["labels"]), 2)
    assert (run / "views").read_text() == "not a folder"
    assert any("not cached" in str(w.message) for w in caught)


def test_two_threads_asking_for_one_view_fit_it_once(neggrad_run, tmp_path, monkeypatch):
    """The dashboard's pump fits a new run's drift map after the run shows as done; an Audit page opened meanwhile
    waits for that fit and reads its cache instead of fitting the same map a second time."""
    import threading
    import time

    from core.audit import views
    from core.runs import load_run

    run = _copy(neggrad_run, tmp_path)
    shutil.rmtree(run / "views", ignore_errors=True)
    rec = load_run(run)
    fits, real = [], views.embedding_drift

    def slow_fit(*args, **kwargs):
        fits.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough that the second thread asks while the first still fits
        return real(*args, **kwargs)

    monkeypatch.setattr(views, "embedding_drift", slow_fit)
    out = {}
    threads = [threading.Thread(target=lambda n=n: out.setdefault(n, views.drift_view(run, rec.audit, rec.meta,
                                                                                      method="pca")), name=n)
               for n in ("pump", "page")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(fits) == 1, fits
    np.testing.assert_array_equal(out["pump"].result.after, out["page"].result.after)


def test_report_says_which_step_a_polished_run_returned(neggrad_run, tmp_path):
    """With polish steps the returned weights are not the last step's: the run table and the history chart say so."""
    run = _copy(neggrad_run, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    plain = build_report(run, tmp_path / "plain.html", drift_method="pca", gradcam=False).path.read_text()
    assert "weights returned" not in plain and "polish steps (shaded)" not in plain
    last = max(h["step"] for h in meta["history"])
    meta["polish"] = {"from": 1, "until": last, "returned": 2, "pick": "mix_kl", "score": 0.1}
    (run / "run.json").write_text(json.dumps(meta))
    html = build_report(run, tmp_path / "r.html", drift_method="pca", gradcam=False).path.read_text()
    assert "weights returned" in html
    assert f"weights from step 2: the lowest mixture KL of the polish steps 1-{last}" in html
    assert "polish steps (shaded); returned: step 2" in html
    meta["polish"] = {"from": 1}  # a damaged record: no claim
    assert returned_step(meta) is None and returned_step({}) is None

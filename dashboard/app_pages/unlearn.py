"""Unlearn: method, ablations, hyperparameters and seed; runs in the background with live curves."""

from __future__ import annotations

import streamlit as st

from core.methods import METHODS, MIX_PAIRS, POLISH_PICKS, default_config, tuned_k
from core.models import PRECISIONS, STAGES
from core.runs import runs_root
from dashboard import resources as R
from dashboard import session as S
from dashboard import widgets

# (field, label, help) for the main hyperparameters; defaults come from core.methods.default_config.
FIELDS: list[tuple[str, str, str]] = [
    ("lr", "Learning rate (backbone)", "SGD step size for the classifier's weights."),
    ("lr_decay", "Learning-rate decay per pass", "The learning rate is multiplied by this after every pass over "
                                                 "the proxy set (1 = constant). It damps the back and forth of the "
                                                 "last forget images (docs/METHOD.md, v13)."),
    ("late_lr", "Late learning-rate factor", "Once forget accuracy has fallen to the threshold below, the learning "
                                             "rate is multiplied by this (1 = off). Smaller steps near the end keep "
                                             "the last forget images from swinging the model back and forth "
                                             "(docs/METHOD.md, v20)."),
    ("late_below", "Late factor from forget accuracy (%)", "The forget accuracy at or under which the late "
                                                           "learning-rate factor starts."),
    ("projector_lr", "Learning rate (projector)", "StructGuard only: step size of the projector p_w. 0 keeps it the "
                                                   "identity it starts as (the default: it keeps more accuracy, "
                                                   "docs/METHOD.md)."),
    ("max_epochs", "Max epochs", "Passes over the proxy set (the forget set for NegGrad); the run stops earlier "
                                 "as soon as forget accuracy reaches 0."),
    ("stop_margin", "Stop margin", "Stop only once every forget image's true-class logit is this far below the best "
                                   "other class (0 = as soon as every one is misclassified). 0.1 keeps a change of "
                                   "precision from bringing an image back, at the price of a few more steps."),
    ("polish_steps", "Polish steps", "Once every forget image is misclassified, go on this many steps and keep the "
                                     "last state in which every one still was (0 = stop at once). The retention "
                                     "terms keep working: 100 kept about half a point more at k=32, in twice the "
                                     "time; at k=128 200 steps are the default of the proxy methods."),
    ("polish_pick", "Polish keeps", "With polish steps: which state in which every forget image was misclassified "
                                    "the run returns. last: the last one; mix_kl: the one whose answers on fresh "
                                    "blends of forget images are closest to the original model's (the default at "
                                    "k=128; docs/METHOD.md, v21-v22)."),
    ("n_adv", "Adversarial variants per forget image", "Size of the proxy set that stands in for the retain data."),
    ("eps", "PGD radius ε (L2)", "How far the adversarial proxies may move from the forget images (pixel space)."),
    ("pgd_iters", "PGD iterations", "Attack steps per proxy batch; fewer is faster, weaker proxies."),
    ("pgd_step", "PGD step size", "Step size of each attack iteration."),
    ("batch_size", "Batch size", "Forget batch and proxy batch size."),
    ("lam", "λ (importance regulariser)", "Weight of the weight-importance term (L2UL, StructGuard SR)."),
    ("momentum", "Momentum", "SGD momentum."),
    ("mix_weight", "Mixture retention weight", "Adv, L2UL, StructGuard: keep the original model's answers on blends "
                                               "of two forget images (0 = off). It holds off the collapse to one "
                                               "class on large forget sets; forgetting takes more passes."),
    ("mix_pairs", "Mixture pairs", "Which two forget images a mixture joins. any: two drawn independently (an image "
                                   "can meet itself, which asks the model to keep that forget image's answers); "
                                   "distinct: never an image with itself (faster to forget); cross: two images of "
                                   "different classes (faster still, keeps less; docs/METHOD.md, v15)."),
    ("dual_lr", "Deletion focus rate", "How fast the deletion push moves to the forget images that keep being "
                                       "recognised (0 = the plain hinge: every image gets the same share)."),
    ("train_from", "First updated stage", "The run changes this ResNet stage and the later ones; the earlier "
                                          "ones keep the original weights and run once per image, which makes "
                                          "each step cheaper. stem = every stage (the authors' loop)."),
    ("precision", "Arithmetic", "What the convolutions of the attacks and update steps compute in. auto: bfloat16 "
                                "where this CPU or GPU has it natively (2-3x faster), else float32. Accuracies, "
                                "the stop rule and the audit are always measured in float32."),
]
PROXY_FIELDS = ("n_adv", "eps", "pgd_iters", "pgd_step", "mix_weight", "mix_pairs")  # methods with proxies only
INT_FIELDS = {"max_epochs", "n_adv", "pgd_iters", "batch_size", "polish_steps"}
CHOICE_FIELDS = {"train_from": STAGES, "precision": PRECISIONS, "mix_pairs": MIX_PAIRS, "polish_pick": POLISH_PICKS}
RANGES = {"lr_decay": (0.01, 1.0), "late_lr": (0.01, 1.0), "late_below": (0.0, 100.0)}  # (min, max) where bounded
ABLATIONS = [("sa", "SA: structure alignment", "Align proxy samples' anchor affinities with the original model's."),
             ("sr", "SR: importance regulariser", "Penalise changes of weights that matter for the alignment."),
             ("cr", "CR: classifier regulariser", "L1 + L2 penalty on the final linear layer.")]

st.title("Unlearn")
ds = R.get_dataset()
model_name = R.default_model_name()
sel, ups = S.selection(), S.uploads()
parent = st.session_state.get("continue_from")

with st.container(border=True):
    c1, c2, c3 = st.columns(3)
    c1.metric("Forget set", f"{len(sel) + len(ups)} images", help="Chosen on the Forget set page.")
    c2.markdown(f"**Anchors**  \nencoder `{S.encoder_choice()}`, "
                f"{'edited' if st.session_state.get('anchors_edited') else 'default'} texts")
    if parent:
        c3.markdown(f"**Continue from run**  \n`{parent}`")
        if c3.button("Start from the original model instead"):
            st.session_state.pop("continue_from", None)
            st.rerun()
    else:
        c3.markdown(f"**Model**  \n`{model_name}` (original)")

names = list(METHODS)
S.widget_defaults(un_method="structguard" if "structguard" in names else names[0], un_seed=0,
                      un_sa=True, un_sr=True, un_cr=True)
method = st.segmented_control("Method", names, key="un_method", required=True,
                              format_func=lambda m: {"neggrad": "NegGrad", "adv": "Adv", "l2ul": "L2UL",
                                                     "structguard": "StructGuard"}.get(m, m))
st.caption(METHODS[method].summary)

k = len(sel) + len(ups)
S.widget_defaults(un_schedule="ours")
schedule = st.segmented_control(
    "Schedule", ["ours", "paper"], key="un_schedule", required=True,
    format_func=lambda s: {"ours": "Our engine (default)", "paper": "Authors' loop"}[s],
    help="Our engine: a bounded hinge deletion whose push moves to the images that resist, frozen BatchNorm, "
         "boundary proxies, the first ResNet stages kept, defaults tuned per forget size on held-out training data. "
         "Authors' loop: their CE ascent, train-mode BatchNorm, random projector, first-pass "
         "rule, importance timing and budgets (100 PGD steps, up to 100 passes): slower, for reproducing the paper.")
defaults = default_config(method, ds.name, k=k or None, schedule=schedule)
bucket = tuned_k(method, ds.name, k or None)
keys = {f: f"un_{method}_{schedule}_k{bucket}_{f}" for f, _, _ in FIELDS}  # one set per tuned forget size
which = "the authors' loop" if schedule == "paper" else "our engine"
st.caption(f"Defaults: {which}" + (f", tuned for forget sets of about {bucket} images." if bucket else "."))
S.widget_defaults(**{keys[f]: getattr(defaults, f) for f, _, _ in FIELDS})

if method == "structguard":
    cols = st.columns(3)
    for col, (k, label, help_) in zip(cols, ABLATIONS, strict=True):
        col.toggle(label, key=f"un_{k}", help=help_)

shown = [f for f in FIELDS if not (f[0] == "projector_lr" and not METHODS[method].uses_projector)
         and not (f[0] in PROXY_FIELDS and not METHODS[method].needs_proxy)
         and not (f[0] == "lam" and method not in ("l2ul", "structguard"))
         and not (f[0] == "dual_lr" and defaults.deletion != "hinge_dual")]
with st.expander("Hyperparameters", expanded=not widgets.busy()):
    cols = st.columns(3)
    for i, (f, label, help_) in enumerate(shown):
        d = getattr(defaults, f)
        with cols[i % 3]:
            if f in CHOICE_FIELDS:
                st.selectbox(label, CHOICE_FIELDS[f], key=keys[f], help=f"{help_} Default {d}.")
            elif f in INT_FIELDS:
                st.number_input(label, min_value=0 if f in ("pgd_iters", "polish_steps") else 1, step=1, key=keys[f],
                                help=f"{help_} Default {d}.")
            else:
                lo, hi = RANGES.get(f, (0.0, None))
                st.number_input(label, min_value=lo, max_value=hi, format="%g", step=d / 10 if d else 0.01,
                                key=keys[f], help=f"{help_} Default {d}.")
    c1, c2 = st.columns([1, 3])
    c1.number_input("Seed", min_value=0, step=1, key="un_seed", help="Seeds the proxy attack and batch order.")
    if c2.button("Restore defaults"):
        for f, _, _ in FIELDS:
            st.session_state[keys[f]] = getattr(defaults, f)
        st.rerun()

S.widget_defaults(un_retain_eval=5000, un_audit_per_class=20, un_eval_precision="auto")
with st.expander("Evaluation", expanded=False):
    e1, e2, e3 = st.columns(3)
    e1.number_input("Retain-accuracy sample", min_value=0, step=500, key="un_retain_eval",
                    help="Retain accuracy is measured on a fixed random subset of the retained training images of "
                         "this size (0 = all of them). The test set is always used in full.")
    e2.number_input("Audit samples per class", min_value=2, step=5, key="un_audit_per_class",
                    help="Retained and test images per class stored with the run for drift, affinity and "
                         "membership-inference pictures.")
    e3.selectbox("Measurement arithmetic", PRECISIONS, key="un_eval_precision",
                 help="What the convolutions compute in when the retain sample, the test set and the audit sample "
                      "are measured. auto: bfloat16 where the CPU or GPU has it natively (about 3x faster; "
                      "accuracies within a quarter of a point of float32), else float32. The forget set is always "
                      "measured in float32, as the engine's stop rule checks it.")

overrides = {f: st.session_state[keys[f]] for f, _, _ in shown} | {"schedule": schedule}
if method == "structguard":
    overrides.update({k: st.session_state[f"un_{k}"] for k, _, _ in ABLATIONS})

running = widgets.busy()
problems = []
if model_name is None and not parent:
    problems.append("No model is loaded (see the Start page).")
if not sel and not ups:
    problems.append("The forget set is empty: pick images on the Forget set page.")
for p in problems:
    st.warning(p)

if st.button("Start unlearning", type="primary", icon=":material/play_arrow:", disabled=bool(problems) or running):
    try:
        req = widgets.make_request(
            model=None if parent else model_name, parent_run=parent, dataset=ds.name, forget_ids=sorted(sel),
            method=method, config=overrides, seed=int(st.session_state.un_seed), runs_root=str(runs_root()),
            retain_eval=int(st.session_state.un_retain_eval), audit_per_class=int(st.session_state.un_audit_per_class),
            eval_precision=st.session_state.un_eval_precision,
            uploads=[(u.pixels, u.label) for u in ups] or None, **widgets.anchor_fields())
    except (ValueError, TypeError) as exc:
        st.error(f"Cannot start: {exc}")
    else:
        widgets.launch(f"{method} on {len(sel) + len(ups)} images", [req], "app_pages/audit.py")
        st.rerun()

widgets.job_panel("unlearn")

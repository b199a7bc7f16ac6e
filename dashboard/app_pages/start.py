"""Start: what is loaded (model, dataset, encoder, device), the teaching demo, the idea."""

from __future__ import annotations

import streamlit as st

from dashboard import resources as R
from dashboard import session as S
from dashboard import widgets

st.title("StructGuard Studio")
st.caption("Structure-faithful instance unlearning for image classifiers: forget a few training images, "
           "keep the shape of everything else the model knows.")

model_name = R.default_model_name()
cols = st.columns(4)

with cols[0].container(border=True):
    st.markdown("**Model**")
    if model_name is None:
        st.warning("No sample model found in `sample_models/`. Train one with `python -m core train` "
                   "or set STRUCTGUARD_MODEL to a model card.")
        card = None
    else:
        try:
            card = R.get_model(model_name).card
        except Exception as exc:  # ModelError: damaged or mismatched weights
            st.error(f"Could not load model `{model_name}`: {exc}")
            card = None
    if card:
        st.markdown(f"`{model_name}`  \n{card.get('arch', '?')} on {card.get('dataset', '?')}")
        acc = card.get("test_acc", card.get("test_accuracy"))
        if acc is not None:
            st.metric("Test accuracy (card)", f"{float(acc):.2f}%")

with cols[1].container(border=True):
    st.markdown("**Dataset**")
    try:
        ds = R.get_dataset()
    except Exception as exc:  # DataError lists every source tried
        st.error(str(exc))
        ds = None
    if ds is not None:
        st.markdown(f"{ds.name}: {len(ds.train):,} train / {len(ds.test):,} test, {ds.num_classes} classes")
        subset = "" if ds.full else " — a subset, not the full splits"
        st.caption(f"Source ({ds.source_kind}): `{ds.source}`{subset}")

with cols[2].container(border=True):
    st.markdown("**Text encoder (anchors)**")
    try:
        choices = R.encoder_choices()
        chosen = S.encoder_choice()
        st.markdown(f"Chosen: `{chosen}`" + (f" → {choices[chosen].split(': ', 1)[-1]}" if chosen == "auto" else ""))
        for name, line in choices.items():
            if name == "auto":
                continue
            ok = line.startswith("available")
            short = line.split(": ", 1)[-1].split(". ")[0]
            st.caption(f"{'✓' if ok else '✗'} `{name}` — {short[:90]}", help=line)
    except ImportError:
        st.info("Encoders are not installed yet (core.encoders).")
    except Exception as exc:
        st.warning(f"Encoder status unavailable: {exc}")

with cols[3].container(border=True):
    st.markdown("**Device**")
    st.markdown(f"`{R.device_name()}`")
    st.caption("CUDA when present, else CPU.")

if card:
    with st.expander("Model card"):
        st.json(card, expanded=False)
if ds is not None:
    with st.expander("Dataset card"):
        st.json(ds.card(), expanded=False)

st.subheader("Teaching demo")
st.markdown("One click: the same small forget set is unlearned twice, once with **NegGrad** (push the loss up on "
            "the forget images, nothing else) and once with **StructGuard** (the same, plus semantic anchors that "
            "hold the embedding space in place). The comparison opens when both are done.")
widgets.demo_launcher(model_name, ds)

st.subheader("The idea")
st.markdown(
    """
- **Instance unlearning** removes the influence of a handful of training images from a trained classifier,
  *without* the rest of the training data.
- Naive unlearning (**NegGrad**: gradient ascent on the forget images) quickly drives their accuracy to zero,
  but it also **collapses the embedding space**: retained classes drift and test accuracy falls.
- **StructGuard** builds a *proxy* of the retained data from adversarial variants of the forget images, and
  stakes the embedding space to **semantic anchors**: text embeddings of each class's visual attributes
  (e.g. *"collar; buttons; long sleeves"*). An alignment loss keeps each proxy sample's affinity to the anchors
  as it was before unlearning, so the structure of what the model still knows survives.
- The journey here: **Forget set** (pick images) → **Anchors** (edit attributes) → **Unlearn** (live curves)
  → **Audit** (accuracies, UMAP drift, affinity heatmaps, Grad-CAM, membership inference) → **Runs** (compare).
"""
)

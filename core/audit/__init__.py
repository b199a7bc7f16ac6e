"""Audit computations over plain arrays: embedding drift, anchor affinity, Grad-CAM, membership inference.

Nothing here imports streamlit; figures live in core.figures, the HTML report in core.report.
Grad-CAM (torch + captum) is in core.audit.gradcam and is imported only when used.
"""

from .affinity import (
                       affinity_difference,
                       anchor_similarity,
                       class_mean_affinity,
                       row_cosine,
                       row_cosine_summary,
                       sample_affinity,
)
from .drift import DriftReducer, DriftResult, embedding_drift, project_snapshots, umap_available, warm_up
from .mia import MIA_DEFINITION, MIAResult, calibrate_threshold, confidence_mia, mia_before_after

__all__ = [
    "MIA_DEFINITION", "DriftReducer", "DriftResult", "MIAResult", "affinity_difference", "anchor_similarity",
    "calibrate_threshold", "class_mean_affinity", "confidence_mia", "embedding_drift", "mia_before_after",
    "project_snapshots", "row_cosine", "row_cosine_summary", "sample_affinity", "umap_available", "warm_up",
]

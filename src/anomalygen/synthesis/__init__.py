"""Image-level anomaly synthesis that belongs to no one method: placing and blending a patch,
photometric augmentations, DRAEM's simulated anomalies (used by the DRAEM generator and by DRAEM's
own training in the evaluation protocol)."""

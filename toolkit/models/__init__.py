"""Models: a registry of architectures (`model.arch`), each built from its own recipe section.

Built in: mae (the ViT MAE), srmae (the workload's SR-MAE), edsr and rcan (CNN baselines for
super-resolution). A new architecture is one module defining a `ModelSpec` plus one line in
`MODELS` (or `register_model(spec)` at run time).
"""

from toolkit.models.params import LoadReport, apply_freeze, load_weights, param_counts
from toolkit.models.registry import MODELS, ModelSpec, build_model, register_model

__all__ = [
    "MODELS",
    "LoadReport",
    "ModelSpec",
    "apply_freeze",
    "build_model",
    "load_weights",
    "param_counts",
    "register_model",
]

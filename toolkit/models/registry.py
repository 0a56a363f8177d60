"""The model registry: architecture name -> its recipe section, builder, tasks and freeze modes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from toolkit.core.registry import Registry
from toolkit.core.schema import ModelBase


@dataclass(frozen=True)
class ModelSpec:
    """One architecture. `build(cfg, **inputs)` gets its own recipe section (an instance of
    `config`) and what the task provides (the SR scale, ...); it knows nothing of the recipe's
    other sections or of distribution."""

    name: str
    config: type[ModelBase]
    build: Callable[..., nn.Module]
    tasks: tuple[str, ...]  # the tasks it can be trained for
    title: str  # how reports name it, e.g. "SR-MAE"
    # Named freeze modes -> the parameter-name prefixes they freeze (`freeze: [encoder]`).
    freeze_modes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # True where the model takes inputs of model.img_size only (SR: img_size / scale at LR), as
    # a ViT with learned position embeddings does: `predict` gives it tiles of that size.
    fixed_size: bool = False
    # True where the built model numbers its parameters' layers (`lr_layer(name)`, `lr_layers`)
    # for optim.layer_decay; a recipe setting it for another architecture is refused.
    layer_decay: bool = False
    # Model keys of a small instance that still has every kind of part (a layer of each, a
    # head): what tests/e2e/test_registered.py trains for every registered architecture, in
    # seconds on a CPU. Empty: the section's defaults are small already.
    small: Mapping[str, Any] = field(default_factory=dict)


# One line per built-in architecture: name -> "module:ModelSpec".
MODELS: Registry[ModelSpec] = Registry(
    "model.arch",
    {
        "mae": "toolkit.models.mae:SPEC",
        "srmae": "toolkit.models.srmae:SPEC",
        "edsr": "toolkit.models.edsr:SPEC",
        "rcan": "toolkit.models.rcan:SPEC",
        "vit_classifier": "toolkit.models.classifier:VIT_SPEC",
        "cnn": "toolkit.models.classifier:CNN_SPEC",
    },
)


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make an architecture known to recipes (`model.arch: <spec.name>`) and every command."""
    return MODELS.register(spec.name, spec)


def build_model(cfg: ModelBase, **inputs: Any) -> nn.Module:
    """The architecture `cfg.arch` built from its section and the task's inputs."""
    return MODELS.get(cfg.arch).build(cfg, **inputs)  # type: ignore[arg-type]

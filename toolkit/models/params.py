"""Parameters by name, for every architecture: freezing, counting, loading earlier weights."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Wrappers that prefix every key: DDP / DeepSpeed ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def apply_freeze(
    model: nn.Module, freeze: Sequence[str], modes: Mapping[str, tuple[str, ...]] | None = None
) -> None:
    """Set requires_grad by name: each entry of `freeze` is a named mode (-> parameter-name
    prefixes) or a regular expression searched in parameter names. Every parameter is set, so
    calling it twice gives the second setting; an entry that matches nothing is a ValueError."""
    modes = modes or {}
    rules = []
    for entry in freeze:
        if entry in modes:
            prefixes = modes[entry]
            rules.append((entry, lambda n, p=prefixes: n.startswith(p)))
        else:
            rx = re.compile(entry)
            rules.append((entry, lambda n, rx=rx: rx.search(n) is not None))
    hits = dict.fromkeys(freeze, 0)
    for name, param in model.named_parameters():
        frozen = [entry for entry, match in rules if match(name)]
        for entry in frozen:
            hits[entry] += 1
        param.requires_grad_(not frozen)
    unused = [entry for entry, n in hits.items() if not n]
    if unused:
        known = ", ".join(modes) or "none"
        raise ValueError(
            f"freeze entry {unused[0]!r} matches no parameter (named modes: {known}; otherwise a "
            "regex searched in parameter names)"
        )
    total, trainable = param_counts(model)
    logger.info("freeze %s: %d of %d parameters trainable", list(freeze), trainable, total)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


@dataclass
class LoadReport:
    """What `load_weights` did, tensor by tensor name."""

    loaded: list[str] = field(default_factory=list)  # copied from the checkpoint
    fresh: list[str] = field(default_factory=list)  # model tensors left at their initialisation
    unused: list[str] = field(default_factory=list)  # checkpoint tensors the model has no use for

    def summary(self) -> str:
        fresh_layers = sorted({k.rsplit(".", 1)[0] for k in self.fresh})
        unused_parts = sorted({_part(k) for k in self.unused})
        return (
            f"loaded {len(self.loaded)} tensors; fresh: {', '.join(fresh_layers) or 'none'}; "
            f"unused: {', '.join(unused_parts) or 'none'}"
        )


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _width_hint(ckpt: Tensor, own: Tensor) -> str:
    """For a norm's or bias's 1-D shape mismatch: the widths, which the user sets by name."""
    if ckpt.ndim == own.ndim == 1:
        return f" (a layer of width {ckpt.shape[0]} in the checkpoint, {own.shape[0]} here)"
    return ""


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load a state dict into `model` by tensor name, for stage chaining between architectures
    that share parts (an MAE's encoder and decoder inside SR-MAE, say).

    Parts are the first component of a name (`encoder`, `sr`, ...). A part the checkpoint lacks
    stays as initialised (`fresh`); a checkpoint part the model lacks is `unused` (the MAE's mask
    token); a part both have must match tensor for tensor and shape for shape, or the models
    differ (depth, width, patch size) and a ValueError says where, before anything is changed.
    """
    ckpt = strip_wrappers({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
    own = model.state_dict()
    if not any(k in own for k in ckpt):
        first = ", ".join(list(ckpt)[:3]) or "none"
        raise ValueError(
            f"no tensor of the checkpoint has a place in this model; its keys: {first}"
        )
    for key, target in own.items():
        if key in ckpt and ckpt[key].shape != target.shape:
            raise ValueError(
                f"{key}: checkpoint has {list(ckpt[key].shape)}, model expects "
                f"{list(target.shape)}{_width_hint(ckpt[key], target)}"
            )
    ckpt_parts, own_parts = {_part(k) for k in ckpt}, {_part(k) for k in own}
    missing = [k for k in own if k not in ckpt and _part(k) in ckpt_parts]
    if missing:
        raise ValueError(
            f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors in all) though it "
            f"has other {_part(missing[0])}.* tensors; was it saved from a different depth?"
        )
    extra = [k for k in ckpt if k not in own and _part(k) in own_parts]
    if extra:
        raise ValueError(
            f"{extra[0]}: checkpoint tensor with no place in the model ({len(extra)} in all); "
            "was it saved from a different depth or model?"
        )
    report = LoadReport(
        loaded=[k for k in own if k in ckpt],
        fresh=[k for k in own if k not in ckpt],
        unused=[k for k in ckpt if k not in own],
    )
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(ckpt[key])
    logger.info("load_weights: %s", report.summary())
    return report

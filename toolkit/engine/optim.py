"""Param groups from the recipe's ordered rules (split by layer under layer-wise lr decay), the
AdamW optimiser, LR schedules and losses."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from toolkit.core.errors import UserError
from toolkit.core.schema import OptimConfig, SchedulerConfig

# Parameters that take no weight decay unless a rule sets one: decaying norms, biases and
# position/mask tokens towards zero only hurts (the MAE and ViT recipes exclude them too).
_NO_DECAY_NAME = re.compile(r"(^|\.)(pos_embed|mask_token|cls_token)$")


def decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim > 1 and not _NO_DECAY_NAME.search(name)


@dataclass
class Group:
    """One optimiser param group: which rule made it, its hyper-parameters and its parameters.
    Under optim.layer_decay, also its layer and the layer's scale, already in `lr`."""

    rule: str  # "optim.groups[i] '<regex>'" or "default"
    lr: float
    weight_decay: float
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    layer: int | None = None  # None: no layer-wise decay
    scale: float = 1.0  # layer_decay ** (top layer - layer); the schedule's floor scales with it

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def name(self) -> str:
        """Unique per rule and layer: the optimiser group's name, logged as train/lr/<name>."""
        return self.rule if self.layer is None else f"{self.rule} layer {self.layer}"


def layer_scales(
    model: nn.Module, decay: float | None
) -> Callable[[str], tuple[int, float]] | None:
    """(layer, lr scale) of a parameter name under layer-wise decay; None when it is off. The
    model numbers its layers (`lr_layer`, `lr_layers`: the ViTs, toolkit.models.vit)."""
    if decay is None or decay == 1.0:
        return None
    if not hasattr(model, "lr_layer"):
        raise UserError(
            f"optim.layer_decay: {type(model).__name__} does not number its layers (only the "
            "ViTs do: mae, srmae, vit_classifier); use null"
        )
    top = int(model.lr_layers)

    def of(name: str) -> tuple[int, float]:
        layer = int(model.lr_layer(name))
        return layer, decay ** (top - layer)

    return of


def build_groups(model: nn.Module, cfg: OptimConfig) -> list[Group]:
    """Every trainable parameter in exactly one group: the first rule whose regex it matches, else
    the default; each split by whether it decays and, under optim.layer_decay, by layer, whose
    scale multiplies the rule's lr. A rule matching nothing is an error."""
    rules = [(i, rule, re.compile(rule.match)) for i, rule in enumerate(cfg.groups)]
    scales = layer_scales(model, cfg.layer_decay)
    groups: dict[tuple[int, bool, int], Group] = {}
    matched = [0] * len(rules)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, param in trainable:
        hit = next(((i, rule) for i, rule, rx in rules if rx.search(name)), None)
        decay = decays(name, param)
        if hit is None:
            key, label, lr, wd = (-1, decay), "default", cfg.lr, cfg.weight_decay
        else:
            i, rule = hit
            matched[i] += 1
            lr = rule.lr if rule.lr is not None else cfg.lr
            wd = rule.weight_decay if rule.weight_decay is not None else cfg.weight_decay
            # An explicit weight_decay in a rule applies to every parameter it matches.
            decay = decay or rule.weight_decay is not None
            key, label = (i, decay), f"optim.groups[{i}] '{rule.match}'"
        layer, scale = scales(name) if scales else (None, 1.0)
        full = (*key, -1 if layer is None else layer)
        if full not in groups:
            groups[full] = Group(label, lr * scale, wd if decay else 0.0, layer=layer, scale=scale)
        groups[full].names.append(name)
        groups[full].params.append(param)
    for (i, rule, _), count in zip(rules, matched, strict=True):
        if not count:
            raise UserError(
                f"optim.groups[{i}]: match '{rule.match}' matches no trainable parameter "
                "(frozen parameters are not trained; remove the rule or change freeze)"
            )
    out = sorted(groups.values(), key=lambda g: (g.rule == "default", g.rule, g.layer or 0,
                                                  g.weight_decay == 0))  # fmt: skip
    # The nanochat check: a parameter missing from the optimiser would silently never train.
    seen = [id(p) for g in out for p in g.params]
    if len(seen) != len(set(seen)) or len(seen) != len(trainable):
        raise RuntimeError("param groups do not cover every trainable parameter exactly once")
    return out


def build_optimizer(
    groups: list[Group], cfg: OptimConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW over the groups; `fused`: one kernel for all parameters (CUDA), not a loop of them."""
    # `lr_scale` rides along in the group (DeepSpeed keeps a group's other keys): the schedule
    # scales its floor by it.
    torch_groups = [
        {"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name,
         "lr_scale": g.scale}
        for g in groups
    ]  # fmt: skip
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused or None)  # fmt: skip


def lr_at(
    step: int,
    base_lr: float,
    cfg: SchedulerConfig,
    steps_per_epoch: int,
    total_steps: int,
    scale: float = 1.0,
) -> float:
    """The learning rate of a group with `base_lr` after `step` optimiser steps: a pure function,
    so the schedule needs no state beyond the step count. `scale`: the group's layer-decay
    scale (already in `base_lr`), which scales the floor eta_min too, so the whole curve is the
    undecayed one times the scale (a decayed base below eta_min would otherwise climb)."""
    warm = cfg.warmup_steps
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "cosine":
        span = max(total_steps - warm, 1)
        progress = min((step - warm) / span, 1.0)
    else:  # cosine_warm_restarts: T_0 counted in epochs as the workload did, applied per step
        period = cfg.T_0 * steps_per_epoch
        t = step - warm
        if cfg.T_mult > 1:
            # Periods T_0, T_0*m, T_0*m^2, ...: find the current one in closed form, as torch does.
            n = int(math.log(t / period * (cfg.T_mult - 1) + 1, cfg.T_mult))
            t -= period * (cfg.T_mult**n - 1) // (cfg.T_mult - 1)
            period *= cfg.T_mult**n
        progress = (t % period) / period
    eta_min = cfg.eta_min * scale
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedulerConfig,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> LambdaLR:
    """Each group follows the schedule from its own base lr (the encoder's 8e-5 and the others'
    5e-4 both follow the curve); state_dict/load_state_dict restore the step exactly."""

    def factor(base: float, scale: float) -> Callable[[int], float]:
        return lambda step: lr_at(step, base, cfg, steps_per_epoch, total_steps, scale) / base

    return LambdaLR(
        optimizer, [factor(g["lr"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    )


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The finetune pixel loss: L1 (the workload's) or MSE, mean over all pixels."""
    losses = {"l1": F.l1_loss, "mse": F.mse_loss}
    return losses[name]

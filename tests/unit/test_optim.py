"""Param-group rules, the schedules (per group, across save/restore) and the losses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from toolkit.core.errors import UserError
from toolkit.engine import optim
from toolkit.runs.recipe import GroupRule, OptimConfig, SchedulerConfig


class Tiny(nn.Module):
    """Names like the SR-MAE's: encoder.*, decoder.*, sr.*, with norms, biases and a pos embed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.encoder.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.decoder = nn.ModuleDict({"proj": nn.Linear(4, 4)})
        self.sr = nn.Conv2d(1, 2, 3)


def by_rule(groups: list[optim.Group]) -> dict[tuple[str, float], set[str]]:
    return {(g.rule, g.weight_decay): set(g.names) for g in groups}


def test_first_match_wins_and_no_decay_for_norms_biases_pos_embed() -> None:
    cfg = OptimConfig(
        lr=5e-4,
        weight_decay=1e-4,
        groups=[GroupRule(match=r"^encoder\.", lr=8e-5), GroupRule(match=r"proj", lr=1e-3)],
    )
    groups = optim.build_groups(Tiny(), cfg)
    enc = "optim.groups[0] '^encoder\\.'"
    assert by_rule(groups) == {
        (enc, 1e-4): {"encoder.proj.weight"},
        (enc, 0.0): {
            "encoder.proj.bias",
            "encoder.norm.weight",
            "encoder.norm.bias",
            "encoder.pos_embed",
        },
        ("optim.groups[1] 'proj'", 1e-4): {"decoder.proj.weight"},
        ("optim.groups[1] 'proj'", 0.0): {"decoder.proj.bias"},
        ("default", 1e-4): {"sr.weight"},
        ("default", 0.0): {"sr.bias"},
    }
    lrs = {g.rule: g.lr for g in groups}
    assert lrs == {enc: 8e-5, "optim.groups[1] 'proj'": 1e-3, "default": 5e-4}


def test_every_trainable_parameter_in_exactly_one_group_and_frozen_in_none() -> None:
    model = Tiny()
    model.encoder.requires_grad_(False)
    groups = optim.build_groups(model, OptimConfig())
    names = [n for g in groups for n in g.names]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and not any(n.startswith("encoder") for n in names)
    opt = optim.build_optimizer(groups, OptimConfig())
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    # Frozen parameters get no optimiser state at all.
    frozen = {id(p) for p in model.encoder.parameters()}
    assert opt.state and not any(id(p) in frozen for p in opt.state)


def test_rule_with_explicit_weight_decay_applies_it_to_biases_too() -> None:
    cfg = OptimConfig(groups=[GroupRule(match=r"^sr\.", weight_decay=0.5)])
    groups = optim.build_groups(Tiny(), cfg)
    assert by_rule(groups)[("optim.groups[0] '^sr\\.'", 0.5)] == {"sr.weight", "sr.bias"}


def test_rule_matching_nothing_is_an_error_naming_it() -> None:
    model = Tiny()
    model.encoder.requires_grad_(False)
    cfg = OptimConfig(groups=[GroupRule(match=r"^encoder\.", lr=8e-5)])
    with pytest.raises(UserError, match=r"optim.groups\[0\]: match '\^encoder\\.' matches no"):
        optim.build_groups(model, cfg)


def test_warm_restarts_match_torch_per_step_for_every_group() -> None:
    spe, sched = 7, SchedulerConfig(name="cosine_warm_restarts", T_0=2, T_mult=2, eta_min=1e-5)
    model = Tiny()
    cfg = OptimConfig(lr=5e-4, groups=[GroupRule(match=r"^encoder\.", lr=8e-5)], scheduler=sched)
    ours = optim.build_optimizer(optim.build_groups(model, cfg), cfg)
    ref = optim.build_optimizer(optim.build_groups(model, cfg), cfg)
    s_ours = optim.build_scheduler(ours, sched, steps_per_epoch=spe, total_steps=100)
    s_ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        ref, T_0=sched.T_0 * spe, T_mult=2, eta_min=1e-5
    )
    for _ in range(100):
        for a, b in zip(ours.param_groups, ref.param_groups, strict=True):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-9, abs=1e-12)
        ours.step(), ref.step(), s_ours.step(), s_ref.step()
    # Each group follows the curve from its own base: the encoder never exceeds 8e-5.
    enc = [g for g in ours.param_groups if "encoder" in g["name"]]
    assert enc and all(g["lr"] <= 8e-5 + 1e-15 for g in enc)


def test_cosine_with_warmup_and_constant() -> None:
    cos = SchedulerConfig(name="cosine", warmup_steps=10, eta_min=0.0)
    lrs = [optim.lr_at(s, 1.0, cos, steps_per_epoch=5, total_steps=110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    const = SchedulerConfig(name="constant")
    assert {optim.lr_at(s, 3e-4, const, 5, 50) for s in range(50)} == {3e-4}


def test_schedule_state_restores_exactly() -> None:
    sched = SchedulerConfig(name="cosine_warm_restarts", T_0=1, eta_min=8e-5)
    cfg = OptimConfig(groups=[GroupRule(match=r"^encoder\.", lr=2e-4)], scheduler=sched)

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = optim.build_optimizer(optim.build_groups(Tiny(), cfg), cfg)
        return opt, optim.build_scheduler(opt, sched, steps_per_epoch=4, total_steps=40)

    opt, s = fresh()
    for _ in range(6):
        opt.step(), s.step()
    saved_sched, saved_opt = s.state_dict(), opt.state_dict()
    expected = []
    for _ in range(5):
        opt.step(), s.step()
        expected.append([g["lr"] for g in opt.param_groups])
    opt2, s2 = fresh()
    opt2.load_state_dict(saved_opt)
    s2.load_state_dict(saved_sched)
    got = []
    for _ in range(5):
        opt2.step(), s2.step()
        got.append([g["lr"] for g in opt2.param_groups])
    assert got == expected
    assert len({round(v, 12) for v in expected[0]}) == 2  # two groups, two different lrs


def test_losses() -> None:
    a, b = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert optim.build_loss("l1")(a, b).item() == pytest.approx(0.5)
    assert optim.build_loss("mse")(a, b).item() == pytest.approx(0.25)
    assert math.isclose(optim.lr_at(0, 1.0, SchedulerConfig(name="constant"), 1, 1), 1.0)


def warm_restarts_formula(
    step: int, base: float, warmup: int, period: int, mult: int, eta_min: float
) -> float:
    """Linear warmup over `warmup` steps ((step + 1) / warmup of the base), then
    CosineAnnealingWarmRestarts counted from the end of warmup: periods of `period` steps,
    each `mult` times the last, the lr falling from the base to eta_min along half a cosine
    in each and jumping back to the base at each restart. Written out by walking the periods."""
    if step < warmup:
        return base * (step + 1) / warmup
    t, length = step - warmup, period
    while t >= length:  # the restarts so far
        t -= length
        length *= mult
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / length)) / 2


@pytest.mark.parametrize("mult", [1, 2])
def test_warm_restarts_after_warmup_follow_the_formula_per_step(mult: int) -> None:
    """Warmup, then restarts counted from its end (the first one T_0 epochs after warmup, not
    after step 0), for each group from its own base lr, through the optimiser's real scheduler."""
    spe, warmup, eta_min = 3, 5, 1e-5
    sched = SchedulerConfig(
        name="cosine_warm_restarts", T_0=2, T_mult=mult, eta_min=eta_min, warmup_steps=warmup
    )
    cfg = OptimConfig(lr=5e-4, groups=[GroupRule(match=r"^encoder\.", lr=8e-5)], scheduler=sched)
    opt = optim.build_optimizer(optim.build_groups(Tiny(), cfg), cfg)
    s = optim.build_scheduler(opt, sched, steps_per_epoch=spe, total_steps=60)
    period = sched.T_0 * spe  # 6 steps
    lrs: list[list[float]] = []
    for _ in range(60):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step(), s.step()
    for step, row in enumerate(lrs):
        for lr, g in zip(row, opt.param_groups, strict=True):
            base = 8e-5 if "encoder" in g["name"] else 5e-4
            want = warm_restarts_formula(step, base, warmup, period, mult, eta_min)
            # LambdaLR sets base * (lr / base): one or two roundings of a float64.
            assert lr == pytest.approx(want, rel=1e-12), (step, g["name"])
    top = [row[-1] for row in lrs]  # the default group, base 5e-4
    assert top[0] == pytest.approx(5e-4 / warmup, rel=1e-12)  # warmup starts at 1/warmup
    # The first restart: the last step of the first period is near eta_min, the next is the base.
    first = warmup + period
    assert top[first - 1] < 0.1 * 5e-4 and top[first] == pytest.approx(5e-4, rel=1e-12)
    second = first + period * mult
    assert top[second - 1] < 0.1 * 5e-4 and top[second] == pytest.approx(5e-4, rel=1e-12)


# --- layer-wise learning-rate decay --------------------------------------------------------------

VIT = {"in_chans": 1, "img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 3, "num_heads": 2,
       "decoder_embed_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2,
       "mlp_ratio": 2.0}  # fmt: skip


def tiny_vit(arch: str) -> nn.Module:
    from toolkit.models.classifier import ViTClassifier, ViTClassifierConfig
    from toolkit.models.srmae import SRMAE

    torch.manual_seed(0)
    if arch == "srmae":
        return SRMAE(**VIT, sr_channels=4, scale=2)
    return ViTClassifier(ViTClassifierConfig(**VIT, num_classes=3))


def expected_layer(name: str, depth: int) -> int:
    """The recipe's numbering, written out: patch embedding 0, block i i + 1, the rest (the
    encoder's last norm, the head, the decoder, the SR layers) depth + 1."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "patch_embed"]:
        return 0
    if parts[:2] == ["encoder", "blocks"]:
        return int(parts[2]) + 1
    return depth + 1


@pytest.mark.parametrize("arch", ["vit_classifier", "srmae"])
def test_layer_decay_gives_each_parameter_its_rule_lr_times_decay_to_its_depth(arch: str) -> None:
    """Every trainable parameter's lr is (its rule's lr, or optim.lr) x decay^(depth + 1 -
    layer); its weight decay is what it would be without layer decay; each group holds one layer
    of one rule, and the optimiser names the groups apart."""
    decay, depth = 0.5, VIT["depth"]
    model = tiny_vit(arch)
    cfg = OptimConfig(lr=5e-4, weight_decay=1e-4, layer_decay=decay,
                      groups=[GroupRule(match=r"^encoder\.", lr=8e-5)])  # fmt: skip
    groups = optim.build_groups(model, cfg)
    lr_of, wd_of = {}, {}
    for g in groups:
        assert len({expected_layer(n, depth) for n in g.names}) == 1  # one layer per group
        for n in g.names:
            lr_of[n], wd_of[n] = g.lr, g.weight_decay
    params = dict(model.named_parameters())
    assert set(lr_of) == set(params)
    for name, p in params.items():
        rule_lr = 8e-5 if name.startswith("encoder.") else 5e-4
        want = rule_lr * decay ** (depth + 1 - expected_layer(name, depth))
        assert lr_of[name] == pytest.approx(want, rel=1e-12), name
        assert wd_of[name] == (1e-4 if p.ndim > 1 else 0.0), name
    # Spot values that do not go through the numbering above.
    assert lr_of["encoder.patch_embed.proj.weight"] == pytest.approx(8e-5 / 16, rel=1e-12)
    assert lr_of["encoder.blocks.2.mlp.fc1.weight"] == pytest.approx(8e-5 / 2, rel=1e-12)
    assert lr_of["encoder.norm.weight"] == pytest.approx(8e-5, rel=1e-12)
    top = "head.weight" if arch == "vit_classifier" else "decoder.pred.weight"
    assert lr_of[top] == pytest.approx(5e-4, rel=1e-12)
    opt = optim.build_optimizer(groups, cfg)
    names = [g["name"] for g in opt.param_groups]
    assert len(set(names)) == len({(g.rule, g.layer) for g in groups})
    assert "optim.groups[0] '^encoder\\.' layer 0" in names


@pytest.mark.parametrize("off", [None, 1.0])
def test_layer_decay_off_gives_the_groups_of_before(off: float | None) -> None:
    model = tiny_vit("srmae")
    rules = [GroupRule(match=r"^encoder\.", lr=8e-5)]
    plain = optim.build_groups(model, OptimConfig(groups=rules))
    got = optim.build_groups(model, OptimConfig(groups=rules, layer_decay=off))
    assert [(g.name, g.lr, g.weight_decay, g.names) for g in got] == [
        (g.name, g.lr, g.weight_decay, g.names) for g in plain
    ]
    assert all(g.layer is None and g.name == g.rule for g in got)


def test_layer_decay_on_a_model_without_layers_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"optim.layer_decay: Tiny does not number its layers"):
        optim.build_groups(Tiny(), OptimConfig(layer_decay=0.75))


def test_layer_decay_groups_follow_the_schedule_scaled_floor_included() -> None:
    """Through the optimiser's real scheduler: each group's lr is its layer's scale times the
    undecayed group's warm-restart curve (warmup, cosine to eta_min, restarts), so a deep
    layer's small base never sits below the floor and climbs towards it."""
    decay, depth, spe, warmup, eta_min = 0.5, VIT["depth"], 3, 2, 4e-5
    sched = SchedulerConfig(name="cosine_warm_restarts", T_0=2, T_mult=1, eta_min=eta_min,
                            warmup_steps=warmup)  # fmt: skip
    cfg = OptimConfig(lr=5e-4, layer_decay=decay, scheduler=sched,
                      groups=[GroupRule(match=r"^encoder\.", lr=8e-5)])  # fmt: skip
    groups = optim.build_groups(tiny_vit("vit_classifier"), cfg)
    opt = optim.build_optimizer(groups, cfg)
    s = optim.build_scheduler(opt, sched, steps_per_epoch=spe, total_steps=30)
    for step in range(30):
        for g, pg in zip(groups, opt.param_groups, strict=True):
            rule_lr = 8e-5 if g.rule.startswith("optim.groups[0]") else 5e-4
            scale = decay ** (depth + 1 - expected_layer(g.names[0], depth))
            curve = warm_restarts_formula(step, rule_lr, warmup, sched.T_0 * spe, 1, eta_min)
            assert pg["lr"] == pytest.approx(scale * curve, rel=1e-12), (step, g.name)
        opt.step(), s.step()

"""The accelerate wrapper: the DeepSpeed config it derives, and the optimiser-group check."""

from __future__ import annotations

import pytest
from torch import nn

from toolkit.engine.accel import Engine, deepspeed_config
from toolkit.engine.optim import build_groups, build_optimizer
from toolkit.runs.recipe import DeepSpeedConfig, GroupRule, OptimConfig, TrainConfig


def test_deepspeed_config_sets_what_matters_explicitly() -> None:
    cfg = deepspeed_config(
        TrainConfig(grad_clip=None, grad_accum=4, precision="bf16"),
        DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_param="cpu"),
        micro_batch=16,
    )
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 if left out
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "communication_data_type" not in cfg  # DeepSpeed's own unless asked
    fp32 = DeepSpeedConfig(zero_stage=2, grad_comm_dtype="fp32")
    assert deepspeed_config(TrainConfig(), fp32, 2)["communication_data_type"] == "fp32"
    plain = deepspeed_config(TrainConfig(grad_clip=0.5), DeepSpeedConfig(zero_stage=1), 2)
    assert (
        plain["gradient_clipping"] == 0.5 and "offload_optimizer" not in plain["zero_optimization"]
    )


def test_check_groups_accepts_the_recipe_and_refuses_anything_else() -> None:
    engine = Engine(TrainConfig(precision="no"), None, micro_batch=2)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        cfg = OptimConfig(lr=1e-3, groups=[GroupRule(match=r"^0\.", lr=2e-4)])
        groups = build_groups(model, cfg)
        model, optimizer, _ = engine.prepare(model, build_optimizer(groups, cfg), None)
        expected = [(g.rule, g.lr, g.weight_decay, g.numel) for g in groups]
        engine.check_groups(optimizer, expected)
        wrong_lr = [(rule, lr * 2, wd, n) for rule, lr, wd, n in expected]
        with pytest.raises(RuntimeError, match="refusing to train"):
            engine.check_groups(optimizer, wrong_lr)
        with pytest.raises(RuntimeError, match=r"optim\.groups"):
            engine.check_groups(optimizer, expected[:-1])  # a group merged or dropped
    finally:
        engine.close()

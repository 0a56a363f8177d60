"""The built-in tasks: one loss definition for training and validation (norm_pix_loss
included), per-sample metrics against an independent computation, the reference row, tiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY_VIT
from toolkit import recipe
from toolkit.engine.validate import validate
from toolkit.metrics import psnr
from toolkit.runs import build_model
from toolkit.tasks import TASKS, Placement, task_of
from toolkit.tasks.mae import mask_noise

ROOT = Path(__file__).resolve().parents[3]
VIT = [f"model.{k}={v}" for k, v in TINY_VIT.items()]


def tiny_recipe(*overrides: str) -> recipe.Recipe:
    return recipe.load(ROOT / "recipes/debug.yaml", [*VIT, *overrides])


def batch(n: int, side: int = 20, scale: int = 2, valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(n)
    hr = torch.rand(n, 1, side, side, generator=g)
    lr = F.avg_pool2d(hr, scale)
    ok = torch.tensor([i < (n if valid is None else valid) for i in range(n)])
    return {"key": [f"k{i}" for i in range(n)], "hr": hr, "lr": lr, "valid": ok}


def test_norm_pix_mae_validation_loss_is_its_training_loss_on_the_same_batch() -> None:
    """Validation asks the task, which asks the model: with norm_pix_loss the validation loss
    of each sample is the model's own loss with that sample's evaluation mask, not a plain
    pixel MSE (which is what a validation of its own would compute)."""
    r = tiny_recipe("model.norm_pix_loss=true")
    task, model = task_of(r), build_model(r).eval()
    b = batch(5)
    result = validate(task, model, [b], Placement())
    patches = (20 // 4) ** 2
    with torch.no_grad():
        out = model(b["hr"], noise=mask_noise(b["key"], patches, r.train.seed))
        plain = ((out.pred - model.patchify(b["hr"])) ** 2).mean(-1)
        plain = (plain * out.mask).sum(1) / out.mask.sum(1)
    logged = result.model.values("loss")
    torch.testing.assert_close(logged, out.sample_loss.double(), rtol=1e-6, atol=0)
    assert logged.mean().item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert (logged - plain.double()).abs().min().item() > 0.1  # the two definitions differ


def test_mae_training_masks_come_from_the_step_stream_evaluation_masks_from_keys() -> None:
    r = tiny_recipe()
    task, model = task_of(r), build_model(r)
    b = batch(3)
    at = Placement()
    one = task.losses(model, b, at, torch.Generator().manual_seed(1))[1].mask
    again = task.losses(model, b, at, torch.Generator().manual_seed(1))[1].mask
    other = task.losses(model, b, at, torch.Generator().manual_seed(2))[1].mask
    assert torch.equal(one, again) and not torch.equal(one, other)
    # evaluation: a sample's mask follows its key, whatever batch it is in
    alone = task.losses(model, {**b, "hr": b["hr"][1:], "key": b["key"][1:]}, at, None)[1].mask
    together = task.losses(model, b, at, None)[1].mask
    assert torch.equal(alone, together[1:])


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_sr_losses_metrics_and_bicubic_reference(loss: str) -> None:
    r = tiny_recipe("task=sr", "model.arch=srmae", "model.sr_channels=4", f"train.loss={loss}")
    task, model = task_of(r), build_model(r).eval()
    b = batch(4)
    res = task.evaluate(model, b, Placement(), tiles=2)
    with torch.no_grad():
        out = model(b["lr"])
    diff = out - b["hr"]
    per = (diff.abs() if loss == "l1" else diff.square()).mean((1, 2, 3))
    torch.testing.assert_close(res.metrics["loss"].float(), per, rtol=1e-5, atol=1e-7)
    # metrics of the clamped output; the reference is bicubic upscaling of the same inputs
    torch.testing.assert_close(res.metrics["psnr"], psnr(out.clamp(0, 1), b["hr"]))
    bicubic = F.interpolate(b["lr"], scale_factor=2, mode="bicubic", align_corners=False)
    torch.testing.assert_close(res.reference["psnr"], psnr(bicubic.clamp(0, 1), b["hr"]))
    assert set(res.metrics) == {"loss", "mse", "psnr", "ssim"}
    assert set(res.reference) == {"mse", "psnr", "ssim"}  # no loss for a reference
    assert [len(row) for row in res.tiles] == [4, 4]  # 2 samples: LR | bicubic | SR | HR
    assert res.tiles[0][0].shape == (1, 20, 20)  # LR shown at HR size


@pytest.mark.parametrize(
    ("normalise", "clamped"),
    [("unit", True), ("percentile", True), ("none", False), ("asinh:0.1", False)],
)
def test_sr_clamps_only_where_the_normalisation_says_values_lie_in_0_1(
    normalise: str, clamped: bool
) -> None:
    """Data beyond [0, 1] (fluxes, an asinh stretch): neither the output nor the bicubic row
    is clamped before the metrics; unit or percentile data: both are."""
    r = tiny_recipe("task=sr", "model.arch=srmae", "model.sr_channels=4",
                    f"data.normalise={normalise}")  # fmt: skip
    task, model = task_of(r), build_model(r).eval()
    b = batch(4)
    b["hr"], b["lr"] = b["hr"] * 3 - 1, b["lr"] * 3 - 1  # values in [-1, 2]
    res = task.evaluate(model, b, Placement(), tiles=0)
    with torch.no_grad():
        out = model(b["lr"])
    bicubic = F.interpolate(b["lr"], scale_factor=2, mode="bicubic", align_corners=False)
    if clamped:
        out, bicubic = out.clamp(0, 1), bicubic.clamp(0, 1)
    torch.testing.assert_close(
        res.metrics["mse"], (out - b["hr"]).square().mean((1, 2, 3)).double()
    )
    torch.testing.assert_close(res.reference["psnr"], psnr(bicubic, b["hr"]))


def test_the_registry_names_the_builtin_tasks_and_says_did_you_mean() -> None:
    assert {"mae", "sr", "classify"} <= set(TASKS.names())
    with pytest.raises(KeyError, match="did you mean 'mae'"):
        TASKS.get("maee")

"""The built-in tasks: one loss definition for training and validation (norm_pix_loss
included), per-sample metrics against an independent computation, the reference row, tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from sklearn.metrics import roc_curve as sk_roc_curve

from tests.helpers import TINY_VIT
from toolkit.core import stats
from toolkit.core.images import psnr
from toolkit.core.metrics import MetricAccumulator
from toolkit.data.normalise import parse
from toolkit.engine.model import build_model
from toolkit.engine.validate import validate
from toolkit.runs import recipe
from toolkit.tasks import TASKS, Placement, task_of
from toolkit.tasks.classify import ClassifyTask
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
    # beside the metrics: the forward model each sample had, the spectra eval.json averages
    spectra = {"spectrum.hr", "spectrum.model", "spectrum.bicubic"}
    assert set(res.metrics) == {*task.metrics, "physical", *spectra}
    assert set(res.reference) == set(task.metrics) - {"loss"}  # no loss for a reference
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
    if normalise == "percentile":  # each sample's statistics, as the loader gives them
        b["norm"] = torch.stack([parse(normalise).fit(lr) for lr in b["lr"]])
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


def classify_values(labels: list[int], scores: torch.Tensor) -> MetricAccumulator:
    """What validation gathers for the classify task (the label and one
    score per class), added in two batches as validation adds them."""
    acc = MetricAccumulator()
    half = len(labels) // 2
    for lo, hi in ((0, half), (half, len(labels))):
        values = {"label": torch.tensor(labels[lo:hi], dtype=torch.float64)}
        values |= {f"score.{k}": scores[lo:hi, k] for k in range(scores.shape[1])}
        acc.add([f"s{i}" for i in range(lo, hi)], values)
    return acc


def classify_task(shards: Path) -> ClassifyTask:
    r = recipe.load(ROOT / "recipes/classify/cnn.yaml", [f"data.shards={shards}"])
    task = task_of(r)
    assert isinstance(task, ClassifyTask) and task.num_classes == 3
    return task


def test_confusion_matrix_rows_are_the_true_class_columns_the_predicted(tmp_path: Path) -> None:
    """eval.json's confusion matrix has one row per true class and one column per predicted
    class (scikit-learn's orientation, which the report's figure labels assume). The case is
    asymmetric, so a transposed matrix fails."""
    # (true, predicted): three 0s taken for 1, one 1 taken for 0, two 1s taken for 2, ...
    pairs = [(0, 1)] * 3 + [(1, 0)] + [(1, 2)] * 2 + [(0, 0)] + [(2, 2)] * 2 + [(1, 1)]
    labels = [t for t, _ in pairs]
    predicted = torch.tensor([p for _, p in pairs])
    scores = torch.full((len(pairs), 3), 0.2, dtype=torch.float64)
    scores[torch.arange(len(pairs)), predicted] = 0.6  # the top score is the prediction
    extras = classify_task(tmp_path).extras(classify_values(labels, scores))
    expected = confusion_matrix(labels, predicted.numpy(), labels=[0, 1, 2])
    assert not np.array_equal(expected, expected.T)
    assert extras["confusion"] == expected.tolist()
    assert extras["confusion"] == [[1, 3, 0], [1, 1, 2], [0, 0, 2]]  # written out: row = true


def test_each_class_roc_curve_is_its_score_column_against_its_label(tmp_path: Path) -> None:
    """eval.json's ROC curve named after class k (the shards' class names, in label order) is
    column k of the scores against label k, point for point with scikit-learn."""
    classes = ["none", "cdm", "vortex"]
    # The fields read_manifest requires, with the class names `shard --labels` writes.
    manifest = {"kind": "hr", "channels": [1], "hr_size": {"min": [8, 8]}, "splits": {}}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "classes": classes}))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    # Each column leans to its own class by a different amount: the three curves differ.
    scores = torch.rand(24, 3, generator=g, dtype=torch.float64)
    scores += F.one_hot(labels, 3) * torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    scores = (scores * 8).round() / 8  # ties, so that points merge
    extras = classify_task(tmp_path).extras(classify_values(labels.tolist(), scores))
    assert extras["classes"] == classes
    assert list(extras["roc"]) == classes
    curves = [extras["roc"][name] for name in classes]
    assert curves[0] != curves[1] != curves[2]
    for k, name in enumerate(classes):
        fpr, tpr, _ = sk_roc_curve(
            (labels == k).numpy(), scores[:, k].numpy(), drop_intermediate=False
        )
        # eval.json rounds to 6 decimals; 24 samples give far fewer than the 200 points kept
        assert extras["roc"][name] == {
            "fpr": [round(v, 6) for v in fpr.tolist()],
            "tpr": [round(v, 6) for v in tpr.tolist()],
        }


def test_classify_bootstrap_statistic_is_accuracy_and_the_aucs_resampled_within_classes(
    tmp_path: Path,
) -> None:
    """The report's classification intervals: on the sample itself the statistic is the
    accuracy and scikit-learn's micro / macro AUC; the strata are the labels."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    labels = torch.arange(30) % 3
    scores = torch.rand(30, 3, generator=g, dtype=torch.float64) + F.one_hot(labels, 3) * 0.4
    values = {"label": labels.double().numpy(), "accuracy": (scores.argmax(1) == labels).double()
              .numpy(), **{f"score.{k}": scores[:, k].numpy() for k in range(3)}}  # fmt: skip
    statistic, strata = classify_task(tmp_path).statistic(values)
    point = statistic(stats.Draw(np.arange(30)[None], 30))[0]
    onehot = F.one_hot(labels, 3).numpy()
    want = [values["accuracy"].mean(), roc_auc_score(onehot, scores.numpy(), average="micro"),
            roc_auc_score(onehot, scores.numpy(), average="macro")]  # fmt: skip
    assert point == pytest.approx(want, abs=1e-12) and 0.3 < want[0] < 0.95
    assert (strata == labels.numpy()).all()

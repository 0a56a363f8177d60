"""Classification: an image in, a class out (the lensing substructure classes: none, CDM
subhalos, vortices); cross-entropy; accuracy, micro and macro one-vs-rest ROC-AUC, the confusion
matrix and ROC curves, from every sample's softmax scores gathered across ranks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.core.metrics import MetricAccumulator, one_vs_rest_auc, roc_curve
from toolkit.core.schema import Recipe
from toolkit.core.stats import Statistic, auc_statistic, concat, mean_statistic
from toolkit.data.format import MANIFEST, Manifest
from toolkit.tasks.base import BatchResult, Placement, Task

_ROC_POINTS = 200  # ROC curves in eval.json are thinned to about this many points


def _thin(fpr: list[float], tpr: list[float]) -> tuple[list[float], list[float]]:
    step = max(1, len(fpr) // _ROC_POINTS)
    keep = sorted({*range(0, len(fpr), step), len(fpr) - 1})
    return [round(fpr[i], 6) for i in keep], [round(tpr[i], 6) for i in keep]


def _names(classes: Any) -> str:
    """Class names for a one-line message: the first few of a long list."""
    shown = ", ".join(classes[:6])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > 6 else "")


class ClassifyTask(Task):
    """The model maps an image [N, C, H, H] (the shards' stored image, `hr`) to logits
    [N, num_classes]; the loss is cross-entropy with the shards' labels (`shard --labels`)."""

    name = "classify"
    title = "classification"
    default_arch = "vit_classifier"
    fields = ("hr", "label")
    metrics = ("loss", "accuracy")
    table = ("accuracy", "auc_micro", "auc_macro")
    compare = ("auc_micro", "auc_macro")
    score = "auc_micro"
    tiles = ()  # no sample map: the report draws ROC curves and the confusion matrix instead
    loss_label = "loss (cross-entropy)"

    def __init__(self, r: Recipe) -> None:
        super().__init__(r)
        self.num_classes = int(getattr(r.model, "num_classes", 0))
        self.shards, self.storage = r.data.shards, r.data.storage_options
        self.class_names: tuple[str, ...] | None = None  # the shards', from `use_shards`

    @classmethod
    def problems(cls, r: Recipe) -> Iterator[tuple[str, str]]:
        if not hasattr(r.model, "num_classes"):
            yield "model.arch", f"{r.model.arch} has no num_classes: not a classifier"
        if r.train.loss is not None:
            yield "train.loss", "the classify task trains cross-entropy: use null"

    def shard_problems(
        self, manifest: Manifest, trained: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """Labels, as many classes as the model has outputs, and (evaluating a run on other
        shards) the classes it was trained on, in its order: a label means its class only."""
        yield from super().shard_problems(manifest, trained)
        where, classes = manifest.root / MANIFEST, manifest.classes
        if not classes:
            return
        if len(classes) != self.num_classes:
            yield (
                f"{where}: the shards hold {len(classes)} classes ({_names(classes)}), but "
                f"model.num_classes is {self.num_classes}: set model.num_classes="
                f"{len(classes)}, or use shards of {self.num_classes} classes"
            )
        elif trained and trained.get("classes") and list(classes) != list(trained["classes"]):
            yield (
                f"{where}: the shards' classes are {_names(classes)}, but the run was trained "
                f"on {_names(trained['classes'])} (labels are indices in that order)"
            )

    def use_shards(self, manifest: Manifest) -> None:
        self.class_names = manifest.classes or ()

    def losses(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, rng: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        logits, y = self.supervised(model, batch, at, "hr", "label")
        return F.cross_entropy(logits.float(), y, reduction="none"), logits

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, tiles: int
    ) -> BatchResult:
        loss, logits = self.losses(model, batch, at, None)
        p = logits.float().softmax(dim=1)
        y = batch["label"].to(p.device)
        values = {"loss": loss, "accuracy": (p.argmax(dim=1) == y).double(), "label": y.double()}
        values |= {f"score.{k}": p[:, k] for k in range(self.num_classes)}
        return BatchResult(values, None, [])

    def _gathered(self, values: MetricAccumulator) -> tuple[Tensor, Tensor]:
        scores = torch.stack([values.values(f"score.{k}") for k in range(self.num_classes)], 1)
        return scores, values.values("label").long()

    def scores(self, values: MetricAccumulator) -> dict[str, float]:
        micro, macro = one_vs_rest_auc(*self._gathered(values))
        return {**super().scores(values), "auc_micro": micro, "auc_macro": macro}

    def statistic(self, values: Mapping[str, np.ndarray]) -> tuple[Statistic, np.ndarray | None]:
        """Accuracy (the mean of the per-sample hits) and the micro and macro AUCs of the
        resample's scores, resampled within each class: every resample keeps the class counts,
        so each class's AUC stays defined."""
        labels = values["label"].astype(np.int64)
        scores = np.stack([values[f"score.{k}"] for k in range(self.num_classes)], axis=1)
        accuracy = mean_statistic(values["accuracy"][:, None])
        return concat(accuracy, auc_statistic(scores, labels)), labels

    def _read_classes(self) -> tuple[str, ...]:
        """The class names of the recipe's shards, where the caller gave no manifest."""
        from toolkit.core.errors import UserError
        from toolkit.data.format import read_manifest

        try:
            return read_manifest(self.shards, self.storage).classes or ()
        except UserError:
            return ()

    def extras(self, values: MetricAccumulator) -> dict[str, Any]:
        """The class names (from the shards, where readable), the confusion matrix (rows: true
        class, columns: predicted) and each class's one-vs-rest ROC curve."""

        scores, labels = self._gathered(values)
        k = self.num_classes
        names = list(self.class_names if self.class_names is not None else self._read_classes())
        names = names if len(names) == k else [str(c) for c in range(k)]
        predicted = scores.argmax(dim=1)
        confusion = torch.zeros(k, k, dtype=torch.long)
        confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        roc = {}
        for c in range(k):
            fpr, tpr = _thin(*roc_curve(scores[:, c], labels == c))
            roc[names[c]] = {"fpr": fpr, "tpr": tpr}
        return {"classes": names, "confusion": confusion.tolist(), "roc": roc}

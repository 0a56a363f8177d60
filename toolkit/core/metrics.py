"""The one list of metrics (name, function, direction, format), MSE / PSNR / SSIM, and per-sample
accumulation that is safe across ranks.

``METRICS`` is what the loop, ``evaluate`` and ``report`` read: a task names the metrics it
reports; each entry says whether higher is better and how to print it. The image convention:

- Image metrics follow `toolkit.core.images` (per image, float64, data range 1).
- A data set's figure is the mean of the per-image values (PSNR is averaged in dB, not computed
  from the mean MSE). In distributed evaluation every rank keeps its samples' values and
  ``MetricAccumulator.gather`` collects them, so each validation sample counts exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from toolkit.core import physics
from toolkit.core.images import mse, psnr
from toolkit.core.seen import Seen

# --- classification: of the gathered scores, not per sample -------------------------------------


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of `x` [N], tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # the last rank of each distinct value
    return (ends - (counts.double() - 1) / 2)[inverse]


def roc_auc(scores: Tensor, positive: Tensor) -> float | None:
    """Area under the ROC curve of `scores` [N] for the `positive` [N] bool samples: the chance
    that a positive scores above a negative (ties count half; the Mann-Whitney U statistic).
    None where one of the two groups is empty."""
    pos = positive.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    ranks = _average_ranks(scores.double())
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def roc_curve(scores: Tensor, positive: Tensor) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) of every threshold, from (0, 0) to (1, 1)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, pos = scores.double()[order], positive.bool()[order]
    tp, fp = pos.double().cumsum(0), (~pos).double().cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)  # one point per distinct score
    last[:-1] = s[1:] != s[:-1]
    n_pos, n_neg = max(pos.sum().item(), 1), max((~pos).sum().item(), 1)
    fpr = [0.0, *(fp[last] / n_neg).tolist()]
    tpr = [0.0, *(tp[last] / n_pos).tolist()]
    return fpr, tpr


def one_vs_rest_auc(scores: Tensor, labels: Tensor) -> tuple[float | None, float | None]:
    """(micro, macro) one-vs-rest ROC-AUC of class scores [N, K] for labels [N]: micro over
    every (sample, class) pair at once, macro the mean of the per-class AUCs (as
    scikit-learn's `roc_auc_score(..., multi_class="ovr")` and its micro average)."""
    k = scores.shape[1]
    onehot = F.one_hot(labels.long(), k).bool()
    micro = roc_auc(scores.reshape(-1), onehot.reshape(-1))
    per_class = [roc_auc(scores[:, c], onehot[:, c]) for c in range(k)]
    known = [a for a in per_class if a is not None]
    return micro, (sum(known) / len(known) if known else None)


@dataclass(frozen=True)
class Metric:
    """One per-sample metric. `fn(seen) -> [N]` computes it from an output and its batch; None:
    the task computes the value itself (its loss). `ideal`: a value that is best (a power
    ratio's 1), where neither direction is."""

    name: str
    title: str  # table column
    higher_is_better: bool
    fmt: str  # format of one value
    fn: Callable[[Seen], Tensor] | None = None
    ideal: float | None = None

    def format(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value)

    def badness(self, values: Tensor) -> Tensor:
        """Larger is worse: for picking the best value and naming the worst samples."""
        if self.ideal is not None:
            return (values - self.ideal).abs()
        return -values if self.higher_is_better else values


def _flux(arc: bool) -> Callable[[Seen], Tensor]:
    def fn(s: Seen) -> Tensor:
        mask = s.truth.signal if arc else None
        median = s.truth.background[0]
        return physics.flux_error(s.data_output, s.truth.data_target, mask, median)

    return fn


def _band(i: int) -> Callable[[Seen], Tensor]:
    return lambda s: s.bands[:, i]


# The one list: a new metric is one line here (and its function in images.py or physics.py).
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("loss", "val loss", False, "{:.6f}"),
        Metric("mse", "MSE", False, "{:.6f}", lambda s: mse(s.output, s.target)),
        Metric("psnr", "PSNR (dB)", True, "{:.2f}", lambda s: psnr(s.output, s.target)),
        Metric("ssim", "SSIM", True, "{:.4f}", lambda s: s.ssim_map.mean(dim=(1, 2, 3))),
        # physics-aware (super-resolution): the output against its own input, in data units,
        # over the signal, and by spatial frequency (`toolkit.core.physics`)
        Metric("lr_psnr", "LR consistency PSNR (dB)", True, "{:.2f}", lambda s: s.lr_psnr),
        Metric("flux_err", "flux error", False, "{:.4f}", _flux(arc=False)),
        Metric("arc_flux_err", "arc flux error", False, "{:.4f}", _flux(arc=True)),
        Metric(
            "arc_psnr",
            "arc PSNR (dB)",
            True,
            "{:.2f}",
            lambda s: physics.masked_psnr(s.output, s.target, s.truth.signal),
        ),
        Metric(
            "arc_ssim",
            "arc SSIM",
            True,
            "{:.4f}",
            lambda s: physics.masked_ssim(s.output, s.target, s.truth.signal, s.ssim_map),
        ),
        Metric("power_low", "power low", False, "{:.3f}", _band(0), ideal=1.0),
        Metric("power_mid", "power mid", False, "{:.3f}", _band(1), ideal=1.0),
        Metric("power_high", "power high", False, "{:.3f}", _band(2), ideal=1.0),
        # classification: accuracy per sample (1 where the top class is the label), the AUCs
        # of the gathered scores (`toolkit.tasks.classify`)
        Metric("accuracy", "accuracy", True, "{:.4f}"),
        Metric("auc_micro", "AUC (micro)", True, "{:.4f}"),
        Metric("auc_macro", "AUC (macro)", True, "{:.4f}"),
    )
}


def metric(name: str) -> Metric:
    if name not in METRICS:
        raise KeyError(f"no metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def image_metrics(names: tuple[str, ...], seen: Seen) -> dict[str, Tensor]:
    """The named metrics of each sample that have a function, ``[N]`` float64 on the CPU."""
    return {n: metric(n).fn(seen).cpu() for n in names if metric(n).fn is not None}


class MetricAccumulator:
    """Per-sample values with the sample keys they belong to, added batch by batch: a metric's
    one number per sample, or a vector per sample (a power spectrum, `[n, K]`).

    Values are kept per sample (not as running sums) so that ``gather`` can merge ranks exactly,
    and so that ``stats`` can name the worst samples.
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._values: dict[str, list[Tensor]] = {}
        self._widths: dict[str, int] = {}  # 0: one number per sample; K: a vector of K

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def names(self) -> list[str]:
        return list(self._values)

    @property
    def scalars(self) -> list[str]:
        """The names of one number per sample (what means, intervals and tables are made of)."""
        return [n for n in self._values if not self._widths[n]]

    def add(self, keys: list[str], values: dict[str, Tensor]) -> None:
        """One batch: its sample keys and, per name, a ``[len(keys)]`` tensor (any dtype) or a
        ``[len(keys), K]`` one (K the same in every batch)."""
        if not values:
            raise ValueError("add() needs at least one metric")
        if self._values and set(values) != set(self._values):
            raise ValueError(f"metrics {sorted(values)} differ from earlier {sorted(self._values)}")
        rows = {}
        for name, v in values.items():
            v = v.detach().to("cpu", torch.float64)
            v = v.reshape(len(keys), -1) if v.ndim > 1 else v.reshape(-1)
            width = v.shape[1] if v.ndim > 1 else 0
            if len(v) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(v)} values for {name!r}")
            if self._widths.get(name, width) != width:
                raise ValueError(f"{name!r}: {width} values per sample, earlier "
                                 f"{self._widths[name]}")  # fmt: skip
            rows[name] = v
        self.keys.extend(keys)
        for name, v in rows.items():  # checked all: now add
            self._widths[name] = v.shape[1] if v.ndim > 1 else 0
            self._values.setdefault(name, []).append(v)

    def values(self, name: str) -> Tensor:
        """All values of one name, ``[count]`` (or ``[count, K]``) float64, in the order of
        ``keys``."""
        if name not in self._values:
            raise KeyError(f"no metric {name!r}; have {self.names}")
        return torch.cat(self._values[name])

    def gather(self) -> MetricAccumulator | None:
        """Every rank's samples of every name, on the main process (sorted by key, so the values
        and their means are the same whatever the number of ranks), None on the others.

        A collective: every rank must call it. The names travel to every rank first (a rank
        with no sample has none, and a name one rank computed is never dropped for the others),
        the values as one float64 tensor on the process group's device to rank 0 alone (8 bytes
        per value, none on the other ranks), the keys as strings to rank 0 alone. Nothing is
        de-duplicated: the loader gives each sample to exactly one rank, and a key seen twice is
        an error rather than counted twice.
        """
        if dist.is_available() and dist.is_initialized():
            merged = _gather_to_main(self)
            if merged is None:
                return None
        else:
            merged = self
        dupes = sorted(k for k, n in Counter(merged.keys).items() if n > 1)
        if dupes:
            raise ValueError(
                f"{len(dupes)} sample key(s) evaluated more than once, e.g. {dupes[:3]}: the "
                "validation loader must give each sample to exactly one rank"
            )
        return merged.by_key()

    def by_key(self) -> MetricAccumulator:
        """The same samples sorted by key (itself where they already are)."""
        if self.keys == sorted(self.keys):
            return self
        order = sorted(range(self.count), key=self.keys.__getitem__)
        index = torch.tensor(order, dtype=torch.long)
        out = MetricAccumulator()
        if self.count:
            out.add([self.keys[i] for i in order], {n: self.values(n)[index] for n in self.names})
        return out

    def table(self, names: list[str]) -> Tensor:
        """``[count, columns]`` float64: one row per sample, a column per metric (K for a
        vector of K)."""
        width = sum(max(self._widths.get(n, 0), 1) for n in names)
        if not self.count:
            return torch.zeros(0, width, dtype=torch.float64)
        return torch.cat([self.values(n).reshape(self.count, -1) for n in names], dim=1)

    def summary(self) -> dict[str, float]:
        """The mean of each metric (each name of one number per sample) over all samples."""
        if not self.count:
            raise ValueError("no samples to summarise")
        return {name: self.values(name).mean().item() for name in self.scalars}

    def stats(self, name: str, worst: int = 5) -> dict:
        """``{"mean", "median", "worst": [(key, value), ...]}`` for one metric; the worst samples
        have the highest MSE, the lowest PSNR / SSIM, the power ratio farthest from 1."""
        v = self.values(name)
        if not len(v):
            raise ValueError("no samples to summarise")
        order = torch.argsort(metric(name).badness(v), descending=True, stable=True)
        return {
            "mean": v.mean().item(),
            "median": _median(v),
            "worst": [(self.keys[i], v[i].item()) for i in order[:worst].tolist()],
        }


def _median(v: Tensor) -> float:
    """The middle value (the mean of the two middle ones for an even count), by sorting:
    torch.quantile refuses more than 2^24 values."""
    s = v.sort().values
    return ((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2).item()


def _gather_to_main(acc: MetricAccumulator) -> MetricAccumulator | None:
    """`MetricAccumulator.gather` across a process group: values padded to the longest rank."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")  # fmt: skip
    world, main = dist.get_world_size(), dist.get_rank() == 0
    layouts: list[Any] = [None] * world
    dist.all_gather_object(layouts, [(n, acc._widths[n]) for n in acc.names] if acc.count else [])
    found = [layout for layout in layouts if layout]
    if any(sorted(layout) != sorted(found[0]) for layout in found):
        raise ValueError(f"the ranks computed different values: {found}")
    layout = sorted(found[0]) if found else []
    names = [n for n, _ in layout]
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[dist.get_rank()] = acc.count
    dist.all_reduce(counts)
    longest = int(counts.max())
    padded = torch.zeros(longest, sum(max(w, 1) for _, w in layout), dtype=torch.float64,
                         device=device)  # fmt: skip
    if acc.count:  # a rank without samples knows no widths of its own
        padded[: acc.count] = acc.table(names).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if main else None
    dist.gather(padded, parts, dst=0)
    keys: list[list[str]] | None = [[] for _ in range(world)] if main else None
    dist.gather_object(acc.keys, keys, dst=0)
    if not main:
        return None
    assert parts is not None and keys is not None
    merged = MetricAccumulator()
    for part, part_keys, n in zip(parts, keys, counts.tolist(), strict=True):
        if not n:
            continue
        values, at = {}, 0
        for name, width in layout:
            values[name] = part[:n, at : at + max(width, 1)].cpu()
            values[name] = values[name] if width else values[name][:, 0]
            at += max(width, 1)
        merged.add(part_keys, values)
    return merged

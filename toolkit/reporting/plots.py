"""The report's figures (PNG, fixed sizes): loss curves, sample maps run through the exported
model, ROC curves, the comparison of runs, a sweep's curves, power spectra."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolkit.core.metrics import metric
from toolkit.reporting.tables import Run, line_label

logger = logging.getLogger(__name__)

# Figure sizes in pixels (100 dpi): fixed, so a report looks the same on every machine.
DPI = 100
LOSS_SIZE = (10.0, 5.0)
COMPARE_PANEL = (5.0, 4.5)  # one metric's panel of the comparison
CURVE_PANEL = (5.5, 4.5)  # one metric's panel of a sweep's curves
TILE_INCHES = 2.4  # one tile of a sample map; one row per sample
SPECTRA_SIZE = (11.0, 4.5)  # the spectra and their ratio to HR's, side by side


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plot_loss(run: Run, path: Path) -> None:
    """Train and val loss against epoch; each group's learning rate on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=LOSS_SIZE, dpi=DPI)
    for key, label, style in (("train/loss", "train loss", "-"), ("val/loss", "val loss", "o-")):
        points = [(m["epoch"], m[key]) for m in run.metrics if key in m and "epoch" in m]
        if points:  # a lone point needs a marker to be seen
            ax.plot(*zip(*points, strict=True), style if len(points) > 1 else "o", label=label,
                    markersize=4)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(run.task.loss_label)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    lr_keys = sorted({k for m in run.metrics for k in m if k.startswith("train/lr/")})
    handles, labels = ax.get_legend_handles_labels()
    if lr_keys:
        ax2 = ax.twinx()
        for i, key in enumerate(lr_keys):
            points = [(m["epoch"], m[key]) for m in run.metrics if key in m and "epoch" in m]
            ax2.plot(*zip(*points, strict=True), "--", linewidth=1, color=f"C{i + 2}",
                     label=f"lr {key.removeprefix('train/lr/')}")  # fmt: skip
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(f"{run.name}: {run.mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def sample_tiles(run: Run, count: int) -> tuple[list[str], list[list[Any]], list[str]]:
    """The first `count` validation samples (of the first batch) through the run's exported
    model: the task's column titles, rows of [C, H, W] tiles, and the samples' keys."""
    import torch

    from toolkit.engine.validate import validate
    from toolkit.runs.directory import check_shards, eval_loader, load_model, locate
    from toolkit.tasks import Placement

    target = locate(run.dir)
    r = target.recipe
    check_shards(target, "val")
    model = load_model(target)
    first = next(iter(eval_loader(r, "val")))
    first = {k: v[:count] for k, v in first.items()}  # only what the map shows goes through
    result = validate(target.task, model, [first], Placement(torch.device("cpu")), count)
    return list(target.task.tiles), result.tiles, list(first["key"][: len(result.tiles)])


def plot_samples(run: Run, path: Path, count: int) -> None:
    """Sample map: one row per sample, its tiles then |output - HR|, PSNR in the titles."""
    from toolkit.core.images import psnr
    from toolkit.core.logging import display_range

    plt = _pyplot()
    titles, rows, keys = sample_tiles(run, count)
    scored = run.task.scored_tiles
    cols = len(titles) + 1
    fig, axes = plt.subplots(len(rows), cols, squeeze=False, dpi=DPI,
                             figsize=(cols * TILE_INCHES, len(rows) * TILE_INCHES))  # fmt: skip
    for i, (row, key) in enumerate(zip(rows, keys, strict=True)):
        hr, out = row[-1], row[-2]
        err = (out - hr).abs().mean(0)  # mean over channels: one map for RGB too
        lo, hi = display_range(row)
        for j, tile in enumerate(row):
            ax = axes[i][j]
            ax.imshow(_display(tile, lo, hi), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            title = titles[j]
            if title in scored:  # peak 1: clamped where the row's values lie in [0, 1]
                shown = tile.clamp(0, 1) if (lo, hi) == (0.0, 1.0) else tile
                title += f" {psnr(shown[None], hr[None]).item():.2f} dB"
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        ax = axes[i][-1]
        im = ax.imshow(err.numpy(), cmap="inferno", vmin=0, vmax=max(float(err.max()), 1e-6))
        ax.set_title(f"|{titles[-2]} - HR|" if i == 0 else "", fontsize=8)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        axes[i][0].text(-0.08, 0.5, key, transform=axes[i][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=8)  # fmt: skip
    fig.suptitle(f"{run.name}: {run.mode}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _display(tile: Any, lo: float, hi: float) -> Any:
    """[C, H, W], lo..hi mapped to [0, 1] -> what imshow takes: [H, W] for one channel,
    [H, W, 3] for RGB."""
    t = ((tile.float() - lo) / (hi - lo)).clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t[:3].permute(1, 2, 0).numpy()


def plot_roc(run: Run, path: Path) -> None:
    """A classifier's one-vs-rest ROC curve per class (AUC in the legend) and its confusion
    matrix (rows: true class, columns: predicted; counts, shaded by the share of the row)."""
    plt = _pyplot()
    ev = run.eval
    classes, confusion = ev["classes"], ev["confusion"]
    fig, (ax, cm) = plt.subplots(1, 2, figsize=(2 * COMPARE_PANEL[0], COMPARE_PANEL[1]), dpi=DPI)
    for name in classes:
        curve = ev["roc"][name]
        ax.plot(curve["fpr"], curve["tpr"], label=name)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    auc = ev["model"].get("auc_micro")
    ax.set_title(f"ROC, one vs rest (micro AUC {metric('auc_micro').format(auc)})", fontsize=9)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)
    rows = [max(sum(r), 1) for r in confusion]
    shares = [[v / n for v in r] for r, n in zip(confusion, rows, strict=True)]
    cm.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, r in enumerate(confusion):
        for j, v in enumerate(r):
            cm.text(j, i, str(v), ha="center", va="center", fontsize=9,
                    color="white" if shares[i][j] > 0.5 else "black")  # fmt: skip
    cm.set_xticks(range(len(classes)), classes, fontsize=8)
    cm.set_yticks(range(len(classes)), classes, fontsize=8)
    cm.set_xlabel("predicted")
    cm.set_ylabel("true")
    cm.set_title(f"confusion ({ev.get('split')} split, {ev.get('count')} images)", fontsize=9)
    fig.suptitle(f"{run.name}: {run.mode}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_compare(table: dict[str, Any], path: Path) -> None:
    """Each compared metric per run as bars, the reference as a dashed line."""
    plt = _pyplot()
    columns = table["compare"]
    runs = [row for row in table["rows"] if row["run"] is not None and row[columns[0]] is not None]
    base = next((row for row in table["rows"] if row["run"] is None), None)
    width, height = COMPARE_PANEL
    width = max(width, 0.8 * len(runs) + 1.5)  # room for every bar's label
    modes = [row["mode"] for row in runs]
    if len(set(modes)) < len(modes):  # the same label twice: the run names tell them apart
        modes = [f"{m}\n{row['run']}" for m, row in zip(modes, runs, strict=True)]
    fig, axes = plt.subplots(1, len(columns), figsize=(width * len(columns), height), dpi=DPI,
                             squeeze=False)  # fmt: skip
    for ax, name in zip(axes[0], columns, strict=True):
        m = metric(name)
        values = [row[name] for row in runs]
        bars = ax.bar(range(len(runs)), values, color="tab:blue")
        ax.bar_label(bars, labels=[m.format(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(runs)), modes, fontsize=8, rotation=30, ha="right",
                      rotation_mode="anchor")  # fmt: skip
        ax.set_ylabel(m.title)
        shown = values + ([base[name]] if base else [])
        low, high = min(shown), max(shown)
        # the bars' differences are what matters: zoom on them, with room when all are equal
        pad = max(0.1 * (high - low), 0.02 * abs(high), 1e-3)
        ax.set_ylim(low - pad, high + pad)
        if base:
            ax.axhline(base[name], color="gray", linestyle="--", label=base["mode"])
            ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_curves(entries: list[dict[str, Any]], path: Path) -> None:
    """One sweep's curves over one key: a panel per metric, a line per combination of the other
    swept keys, points at the seeds' mean with their bars; the key on a log axis (swept sizes
    and rates are spaced by factors), linear where a value is not positive."""
    plt = _pyplot()
    width, height = CURVE_PANEL
    fig, axes = plt.subplots(1, len(entries), figsize=(width * len(entries), height), dpi=DPI,
                             squeeze=False)  # fmt: skip
    for ax, e in zip(axes[0], entries, strict=True):
        for i, line in enumerate(e["lines"]):
            points = [p for p in line["points"] if p["mean"] is not None]
            if not points:
                continue
            x = [p["x"] for p in points]
            y = [p["mean"] for p in points]
            err = [[p["mean"] - p["low"] for p in points], [p["high"] - p["mean"] for p in points]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, markersize=4, color=f"C{i}",
                        label=line_label(line))  # fmt: skip
        if all(x > 0 for x in e["x"]):
            ax.set_xscale("log")
        ax.set_xticks(e["x"], [f"{x:g}" for x in e["x"]])
        ax.minorticks_off()
        ax.set_xlabel(e["key"])
        ax.set_ylabel(metric(e["metric"]).title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(entries[0]['sweep']).name}: mean over seeds, bars: interval of the "
                 "mean (or ± std)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_spectra(runs: list[Run], path: Path) -> None:
    """The radially averaged power spectra over the validation set (eval.json's `spectra`): HR
    and bicubic (from the first run) and each run's output on log axes, and each one's ratio
    to HR's, where missing or invented fine structure shows at high frequency."""
    plt = _pyplot()
    fig, (ax, rx) = plt.subplots(1, 2, figsize=SPECTRA_SIZE, dpi=DPI)
    first = runs[0].eval["spectra"]
    f = first["frequency"]
    lines = [("HR", first["hr"], {"color": "black", "linewidth": 2})]
    lines.append((runs[0].task.reference or "reference", first["bicubic"],
                  {"color": "gray", "linestyle": "--"}))  # fmt: skip
    lines += [(f"{run.mode} ({run.name})", run.eval["spectra"]["model"], {}) for run in runs]
    for label, power, style in lines:
        ax.loglog(f, power, label=label, **style)
        rx.semilogx(f, [p / h if h > 0 else float("nan") for p, h in zip(power, first["hr"],
                                                                      strict=True)],
                    label=label, **style)  # fmt: skip
    ax.set_xlabel("spatial frequency (cycles per HR pixel)")
    ax.set_ylabel("mean power")
    rx.set_xlabel("spatial frequency (cycles per HR pixel)")
    rx.set_ylabel("power / HR power")
    rx.axhline(1.0, color="black", linewidth=0.8)
    for third in (1 / 6, 1 / 3):  # the edges of the low / mid / high bands of the table
        for a in (ax, rx):
            a.axvline(third, color="gray", linewidth=0.6, linestyle=":")
    ax.legend(fontsize=7)
    from matplotlib.ticker import NullFormatter

    for a in (ax, rx):
        a.grid(True, which="both", alpha=0.3)
        a.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short decade
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)

"""A whole report written into a folder: results.md and results.json, then every figure."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.core.atomic import make_folder
from toolkit.core.errors import UserError
from toolkit.reporting.plots import (
    plot_compare,
    plot_curves,
    plot_loss,
    plot_roc,
    plot_samples,
    plot_spectra,
)
from toolkit.reporting.tables import curves, markdown_all, read_runs, tables

logger = logging.getLogger(__name__)


def report(run_dirs: Sequence[Path], out: Path, samples: int = 4,
           pairs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:  # fmt: skip
    """Write the whole report for `run_dirs` into `out`; returns results.json's content.
    `pairs`: (run, run) names whose paired differences are wanted besides the usual ones."""
    runs = [run for d in run_dirs for run in read_runs(Path(d))]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UserError(f"run directories must have distinct names (file names): {names}")
    doc = {"tables": tables(runs, pairs), "runs": [str(run.dir) for run in runs]}
    doc["curves"] = curves(runs, doc["tables"])
    figures: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for entry in doc["curves"]:  # one figure per sweep and key, a panel per metric
        figures.setdefault((entry["sweep"], entry["task"], entry["key"]), []).append(entry)
    names: list[str] = []
    for (_, _, key), entries in figures.items():
        name = f"curve_{key}.png".replace("/", "_")
        if name in names:  # another sweep (or task) over the same key
            name = f"curve_{key}_{len(names) + 1}.png".replace("/", "_")
        names.append(name)
        for entry in entries:
            entry["png"] = name
    make_folder(out)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(markdown_all(doc))
    for run in runs:
        plot_loss(run, out / f"loss_{run.name}.png")
        if "roc" in run.eval:  # a classifier: its ROC curves and confusion matrix
            plot_roc(run, out / f"roc_{run.name}.png")
            continue
        try:
            plot_samples(run, out / f"samples_{run.name}.png", samples)
        except UserError as err:  # weights or shards gone: the rest of the report still stands
            logger.warning("no sample map for %s: %s", run.name, err)
    for name, entries in zip(names, figures.values(), strict=True):
        plot_curves(entries, out / name)
    compared = [t for t in doc["tables"] if _comparable(t)]
    for i, table in enumerate(compared):
        plot_compare(table, out / ("compare.png" if i == 0 else f"compare_{table['task']}.png"))
    spectra = [run for run in runs if "spectra" in run.eval]  # super-resolution runs
    if spectra:
        plot_spectra(spectra, out / "spectra.png")
    logger.info("report of %d run(s) in %s", len(runs), out)
    return doc


def _comparable(table: dict[str, Any]) -> bool:
    """A comparison needs the task's compare metrics and two rows to compare, one a run."""
    scored = [row for row in table["rows"] if table["compare"] and row[table["compare"][0]]
              is not None]  # fmt: skip
    return len(scored) > 1 and any(row["run"] for row in scored)

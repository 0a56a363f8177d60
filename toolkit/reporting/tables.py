"""Run directories -> one results table per task: each run's recipe, eval.json and loss log
read; rows with bootstrap intervals, paired differences (each run against the best and the
reference, and the pairs asked for), seed groups averaged, curves over a sweep's numeric key;
the Markdown of all of it."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core import stats
from toolkit.core.errors import UserError
from toolkit.core.metrics import metric
from toolkit.core.stats import Samples
from toolkit.runs import recipe
from toolkit.tasks import Task, task_of

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One run directory, as the report reads it."""

    dir: Path
    recipe: recipe.Recipe
    eval: dict[str, Any]
    metrics: list[dict[str, Any]]
    # A sweep variant's swept overrides but the seed: runs with the same one are repeats,
    # shown as one row (mean and std); None for a run that is not part of a sweep.
    group: str | None = None
    # A sweep variant's swept `key: value` texts (the seed too), from sweep.json.
    swept: dict[str, str] | None = None
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def task(self) -> Task:
        return task_of(self.recipe)

    @property
    def mode(self) -> str:
        """The run's row name: its recipe's label, else its architecture and freeze."""
        return self.task.label(self.recipe)

    @property
    def samples(self) -> Samples | None:
        """Every validation sample's values (`eval.samples.npz`, named by eval.json); None for
        an evaluation written before they were kept."""
        name = self.eval.get("samples")
        if not name:
            return None
        if "samples" not in self._cache:
            self._cache["samples"] = Samples.read(self.dir / name)
        return self._cache["samples"]

    @property
    def epochs(self) -> float:
        """Epochs trained, from the log (the recipe's count may have been capped)."""
        return max((m["epoch"] for m in self.metrics if "epoch" in m), default=0.0)

    @property
    def images_per_s(self) -> float | None:
        """The training speed it ran at: the median img/s of its log windows, the first (start-up,
        first batches, compiling) left out where there are more; None when none was logged."""
        return images_per_s(self.metrics)


def images_per_s(metrics: Sequence[dict[str, Any]]) -> float | None:
    """The median img/s of a run's logged windows (metrics.jsonl's lines), the first left out
    where there are more; None when none was logged."""
    rates = [m["train/images_per_s"] for m in metrics if "train/images_per_s" in m]
    return statistics.median(rates[1:] or rates) if rates else None


def read_run(run_dir: Path) -> Run:
    """A run directory's recipe, evaluation and metrics; a user error names what is missing."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory")
    for name, hint in (("recipe.yaml", "is it a run directory?"),
                       ("eval.json", f"evaluate it first: python -m toolkit.evaluate {run_dir}"),
                       ("metrics.jsonl", "has it trained?")):  # fmt: skip
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; {hint}")
    try:
        ev = json.loads((run_dir / "eval.json").read_text())
        model = ev["model"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{run_dir / 'eval.json'}: not an evaluation ({err!r})") from None
    if not isinstance(model, dict):
        raise UserError(f"{run_dir / 'eval.json'}: key 'model' should be an object")
    r = recipe.load(run_dir / "recipe.yaml")
    if ev.get("task") not in (None, r.task):  # evaluations before tasks carry none
        raise UserError(f"{run_dir / 'eval.json'}: an evaluation of a {ev['task']} model, but "
                        f"recipe.yaml describes a {r.task} run; evaluate it again")  # fmt: skip
    metrics = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            metrics.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill: the others still make a curve
    return Run(run_dir, r, ev, metrics)


def read_runs(path: Path) -> list[Run]:
    """A run directory, or a sweep's directory (`launch --sweep`): each variant's run, grouped
    by its swept keys but the seed; variants not evaluated yet are left out with a warning."""
    from toolkit.runs import sweep

    record = sweep.read(path)
    if record is None:
        return [read_run(path)]
    runs = []
    for variant in record["variants"]:
        run_dir = path / variant["name"]
        if not (run_dir / "eval.json").is_file():
            logger.warning("%s: not evaluated yet, left out", run_dir)
            continue
        # A swept recipe file as its stem (`recipe=cnn`): the rows' and the curves' labels.
        shown = [sweep.shown(o) for o in variant["overrides"]]
        group = ",".join(o for o in shown if not o.startswith(f"{sweep.SEED}="))
        swept = dict(o.partition("=")[::2] for o in shown)
        runs.append(dataclasses.replace(read_run(run_dir), group=group, swept=swept))
    if not runs:
        raise UserError(f"{path}: none of the sweep's {len(record['variants'])} runs is evaluated")
    return runs


# --- the tables --------------------------------------------------------------------------------


def tables(runs: list[Run], asked: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """One table per task, in the order the runs name them: a row per run with the task's
    table metrics, then the task's reference row (bicubic for super-resolution). `asked`:
    pairs of rows (by run name) whose paired difference is wanted besides the usual ones."""
    from toolkit.runs.directory import param_summary

    out: dict[str, dict[str, Any]] = {}
    handles: dict[int, _Handle] = {}  # id(row) -> what its resamples are computed from
    groups: dict[tuple[str, str | None, str], list[Run]] = {}
    for run in runs:  # repeats of one sweep variant (other seeds) become one row
        key = (run.task.name, run.group, run.name if run.group is None else str(run.dir.parent))
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        run, task = members[0], members[0].task
        table = out.setdefault(task.name, {"task": task.name, "title": task.title,
                                           "columns": list(task.table),
                                           "compare": list(task.compare), "rows": [],
                                           "more": []})  # fmt: skip
        row = {
            "run": run.name if run.group is None else run.group or "(all)",
            "mode": run.mode,
            **_means(members, task.table),
            "trainable": param_summary(run.recipe)["trainable"],
            "epochs": round(run.epochs, 2),
            "init_from": run.recipe.init.from_,
            "images_per_s": _median([m.images_per_s for m in members]),
            "split": run.eval.get("split"),
            "count": run.eval.get("count"),
            # its sweep's directory: two sweeps can have rows of the same swept values
            "sweep": None if run.group is None else str(run.dir.parent),
        }  # fmt: skip
        table["rows"].append(row)
        handle = _run_handle(members, task.table)
        if handle is not None:
            handles[id(row)] = handle
        for more in _more(table, task):
            if not all(k in m.eval["model"] for m in members for k in more["columns"]):
                continue  # evaluated before these metrics were: the row is left out
            extra = {k: row[k] for k in ("run", "mode", "split", "count", "sweep")}
            extra |= _means(members, more["columns"])
            more["rows"].append(extra)
            handle = _run_handle(members, more["columns"])
            if handle is not None:
                handles[id(extra)] = handle
    named = {row["run"] for table in out.values() for row in table["rows"]}
    for a, b in asked:
        for name in (a, b):
            if name not in named:
                raise UserError(f"--pair {a}:{b}: no run {name!r} among {sorted(named)}")
    for table in out.values():
        task_runs = [run for run in runs if run.task.name == table["task"]]
        table["more"] = [more for more in table["more"] if more["rows"]]
        for part in (table, *table["more"]):
            ref = reference_row(task_runs, part["columns"])
            if ref is not None:
                part["rows"].append(ref)
                handle = _reference_handle(task_runs, part["columns"])
                if handle is not None:
                    handles[id(ref)] = handle
            for row in part["rows"]:
                _add_intervals(row, handles.get(id(row)), part["columns"])
            part["best"] = best(part["rows"], part["columns"])
        table["pairs"] = _pairs(table, handles, task_runs[0].task.score, asked)
        table["bootstrap"] = {"level": stats.LEVEL, "resamples": stats.RESAMPLES,
                              "seed": stats.SEED}  # fmt: skip
    return list(out.values())


# --- intervals and paired differences ----------------------------------------------------------


@dataclass(frozen=True)
class _Handle:
    """What a row's bootstrap is computed from: its samples' keys, the statistic of its table
    columns, the strata to resample within, and where it came from (for messages)."""

    samples: Samples
    statistic: stats.Statistic
    strata: Any
    where: str


def _values(run: Run, part: str) -> dict[str, Any]:
    samples = run.samples
    assert samples is not None
    if part not in samples.parts:
        raise UserError(f"{run.dir / run.eval['samples']}: no {part!r} values")
    return samples.parts[part]


def _more(table: dict[str, Any], task: Task) -> list[dict[str, Any]]:
    """The task table's more tables (`Task.more_tables`), made on its first row."""
    if not table["more"]:
        table["more"] = [{"name": name, "title": f"{task.title}: {name}", "columns": list(columns),
                          "note": note, "rows": []}
                         for name, columns, note in task.more_tables]  # fmt: skip
    return table["more"]


def _statistic(
    task: Task, run: Run, part: str, columns: Sequence[str]
) -> tuple[stats.Statistic, Any]:
    values = _values(run, part)
    try:
        if part == "model" and tuple(columns) == task.table:
            return task.statistic(values)
        return stats.mean_statistic(_columns(values, tuple(columns))), None
    except KeyError as err:
        where = run.dir / run.eval["samples"]
        raise UserError(f"{where}: no {part}.{err.args[0]} values, which the {task.name} "
                        "table needs; evaluate it again") from None  # fmt: skip


def _columns(values: dict[str, Any], names: tuple[str, ...]) -> Any:
    import numpy as np

    return np.stack([values[n] for n in names], axis=1)


def _run_handle(members: list[Run], columns: Sequence[str]) -> _Handle | None:
    """A row of one run, or of a seed group: the mean over its runs of each run's statistic, on
    the same resamples of the images (the runs' keys must be the same)."""
    if any(run.samples is None for run in members):
        return None
    first = members[0]
    assert first.samples is not None
    others = [run for run in members[1:] if not stats.same_keys(first.samples, run.samples)]
    if others:
        logger.warning("%s and %s: seeds of one row evaluated on other samples; no interval",
                       first.dir, others[0].dir)  # fmt: skip
        return None
    parts = [_statistic(first.task, run, "model", columns) for run in members]
    statistic = parts[0][0] if len(parts) == 1 else stats.average([p[0] for p in parts])
    return _Handle(first.samples, statistic, parts[0][1], str(first.dir))


def _reference_handle(runs: list[Run], columns: Sequence[str]) -> _Handle | None:
    """The reference row's values from the first run that kept them."""
    name = runs[0].task.reference
    for run in runs:
        kept = run.samples.parts.get(name or "", {}) if run.samples is not None else {}
        if name and kept and all(k in kept for k in columns):
            statistic, strata = _statistic(run.task, run, name, columns)
            return _Handle(run.samples, statistic, strata, f"{run.dir} ({name})")
    return None


def _add_intervals(row: dict[str, Any], handle: _Handle | None, columns: Sequence[str]) -> None:
    """`<column>_ci`: [low, high] of each column, None without per-sample values."""
    if handle is None:
        for k in columns:
            row[f"{k}_ci"] = None
        return
    iv = stats.bootstrap(handle.statistic, len(handle.samples.keys), handle.strata)
    for j, k in enumerate(columns):
        row[f"{k}_ci"] = [float(iv.low[j]), float(iv.high[j])]


def _label(row: dict[str, Any]) -> str:
    return row["mode"] + (f" (`{row['run']}`)" if row["run"] else "")


def _pairs(table: dict[str, Any], handles: dict[int, _Handle], score: str,
           asked: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """Paired differences on the same validation samples: each run row against the best run
    row (by the task's score), the pairs `asked` for (run names; a pretrained run against its
    control from scratch, say), and each run row against the reference row. Rows evaluated on
    other samples than the pair's second row are left out."""
    rows = [row for row in table["rows"] if id(row) in handles]
    runs = [row for row in rows if row["run"] is not None and row.get(score) is not None]
    pairs = []
    if runs:
        pick = max if metric(score).higher_is_better else min
        top = pick(runs, key=lambda row: row[score])
        pairs += [(row, top) for row in runs if row is not top]
    by_name = {row["run"]: row for row in runs}
    for a, b in asked:
        if a in by_name and b in by_name and (by_name[a], by_name[b]) not in pairs:
            pairs.append((by_name[a], by_name[b]))
    ref = next((row for row in rows if row["run"] is None), None)
    if ref is not None:
        pairs += [(row, ref) for row in runs]
    out = []
    for a, b in pairs:
        ha, hb = handles[id(a)], handles[id(b)]
        if not stats.same_keys(ha.samples, hb.samples):
            logger.warning("%s and %s: other validation samples; not paired", ha.where, hb.where)
            continue
        iv = stats.paired(ha.samples, ha.statistic, hb.samples, hb.statistic, ha.strata,
                          ha.where, hb.where)  # fmt: skip
        entry: dict[str, Any] = {"a": _label(a), "b": _label(b), "count": len(ha.samples.keys)}
        for j, k in enumerate(table["columns"]):
            low, high = float(iv.low[j]), float(iv.high[j])
            entry[k] = {"diff": float(iv.point[j]), "ci": [low, high],
                        "significant": not low <= 0.0 <= high}  # fmt: skip
        out.append(entry)
    return out


def _means(runs: list[Run], columns: Sequence[str]) -> dict[str, Any]:
    """Each column's value; over several runs (seeds) its mean, `<column>_std` the sample
    standard deviation and `n` how many runs."""
    if len(runs) == 1:
        return {k: runs[0].eval["model"].get(k) for k in columns}
    out: dict[str, Any] = {"n": len(runs)}
    for k in columns:
        values = [r.eval["model"].get(k) for r in runs]
        if any(v is None for v in values):
            out[k] = out[f"{k}_std"] = None
            continue
        mean = sum(values) / len(values)
        out[k] = mean
        out[f"{k}_std"] = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return out


def reference_row(runs: list[Run], columns: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The task's reference on the same data (from the first run that has one): its values of
    `columns` (the task's table by default)."""
    name = runs[0].task.reference
    refs = [(run, run.eval[name]) for run in runs if name and run.eval.get(name)
            and (columns is None or all(k in run.eval[name] for k in columns))]  # fmt: skip
    if not refs:
        return None
    if any(values != refs[0][1] for _, values in refs):
        logger.warning("the runs' %s rows differ (other data?); the first is shown", name)
    first, values = refs[0]
    columns = first.task.table if columns is None else columns
    return {"run": None, "mode": name, **{k: values.get(k) for k in columns}, "trainable": None,
            "epochs": None, "init_from": None, "images_per_s": None,
            "split": first.eval.get("split"),
            "count": first.eval.get("count")}  # fmt: skip


def best(rows: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, float]:
    """The best value of each metric column, by the metric's direction (or nearest its ideal)."""
    import torch

    out = {}
    for k in columns:
        values = [row[k] for row in rows if row.get(k) is not None]
        if values:
            badness = metric(k).badness(torch.tensor(values, dtype=torch.float64))
            out[k] = values[int(torch.argmin(badness))]
    return out


def markdown(table: dict[str, Any]) -> str:
    """One task's table, the best value per metric column in bold."""
    columns, top = table["columns"], table["best"]
    titles = ["Mode", *(metric(k).title for k in columns), "trainable params", "epochs",
              "init from", "train img/s"]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in table["rows"]:
        cells = _cells(row, columns, top)
        cells.append("-" if row["trainable"] is None else f"{row['trainable']:,}")
        cells.append("-" if row["epochs"] is None else f"{row['epochs']:g}")
        cells.append(f"`{Path(row['init_from']).name}`" if row["init_from"] else "-")
        speed = row.get("images_per_s")  # None: a reference, or a run that logged none
        cells.append("-" if speed is None else f"{speed:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    splits = {(row["split"], row["count"]) for row in table["rows"] if row["split"]}
    ref = next((row["mode"] for row in table["rows"] if row["run"] is None), None)
    if len(splits) == 1:
        split, count = splits.pop()
        tail = f"; {ref}: the reference, on the same inputs" if ref else ""
        lines += ["", f"{split} split, {count} images{tail}."]
    else:
        lines += ["", "Runs evaluated on different splits: " + ", ".join(
            f"{row['run']} {row['split']} ({row['count']})" for row in table["rows"] if row["run"]
        )]  # fmt: skip
    if any(row.get(f"{k}_ci") for row in table["rows"] for k in columns):
        boot = table.get("bootstrap") or {}
        how = f"{boot.get('level', stats.LEVEL):.0%} bootstrap interval over the images " \
              f"({boot.get('resamples', stats.RESAMPLES)} resamples" + \
              (", within each class)" if table["task"] == "classify" else ")")  # fmt: skip
        seeds = "; ± the standard deviation over seeds, the interval that of their mean" \
            if any(row.get("n") for row in table["rows"]) else ""  # fmt: skip
        lines.append(f"[low, high]: the {how}{seeds}.")
    if table.get("pairs"):
        lines += ["", "Paired differences on the same images (A - B, the interval of the "
                  "difference; n.s.: not significant, the interval contains 0):", "",
                  "| A - B | " + " | ".join(metric(k).title for k in columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]  # fmt: skip
        for pair in table["pairs"]:
            cells = [f"{pair['a']} - {pair['b']}"]
            for k in columns:
                signed = metric(k).fmt.replace("{:", "{:+")
                d = pair[k]
                text = "{} [{}, {}]".format(*map(signed.format, (d["diff"], *d["ci"])))
                cells.append(text + ("" if d["significant"] else " n.s."))
            lines.append("| " + " | ".join(cells) + " |")
    for more in table.get("more", []):
        lines += ["", f"**{more['title']}** ({more['note']})", "",
                  "| Mode | " + " | ".join(metric(k).title for k in more["columns"]) + " |",
                  "|" + "---|" * (len(more["columns"]) + 1)]  # fmt: skip
        lines += ["| " + " | ".join(_cells(row, more["columns"], more["best"])) + " |"
                  for row in more["rows"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def _cells(row: dict[str, Any], columns: Sequence[str], top: dict[str, float]) -> list[str]:
    """A row's name and its value of each column: the best in bold, then ± the standard
    deviation over seeds and the [low, high] interval where there are."""
    seeds = f", {row['n']} seeds" if row.get("n") else ""
    cells = [row["mode"] + (f" (`{row['run']}`{seeds})" if row["run"] else "")]
    for k in columns:
        v = row.get(k)
        text = metric(k).format(v)
        text = f"**{text}**" if v is not None and v == top.get(k) else text
        if row.get(f"{k}_std") is not None:
            text += f" ± {metric(k).format(row[f'{k}_std'])}"
        if row.get(f"{k}_ci") is not None:
            text += " [{}, {}]".format(*map(metric(k).format, row[f"{k}_ci"]))
        cells.append(text)
    return cells


def markdown_all(doc: dict[str, Any]) -> str:
    """Every task's table; with several, each under its task's title; then a sweep's curves."""
    if len(doc["tables"]) == 1:
        text = markdown(doc["tables"][0])
    else:
        text = "\n".join(f"### {t['title']} (`{t['task']}`)\n\n{markdown(t)}"
                         for t in doc["tables"])  # fmt: skip
    if doc.get("curves"):
        text += "\n### Curves over the swept values\n\n" + curves_markdown(doc["curves"])
    return text


# --- curves over a numeric swept key ----------------------------------------------------------


def curves(runs: list[Run], doc_tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each sweep (and task), each swept key but the seed whose value is a number in every
    run's resolved recipe: one entry per table metric, that metric against the key with one line
    per combination of the other swept keys. A point is the line's table row at that value (the
    seeds' mean); its bars the row's interval of that mean, or mean ± the standard deviation
    over seeds where the row has none (no per-sample values). A key with other values (a path,
    a list, null) draws no curve."""
    from toolkit.runs import sweep

    out: list[dict[str, Any]] = []
    by_sweep: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.swept is not None:
            by_sweep.setdefault((str(run.dir.parent), run.task.name), []).append(run)
    for (where, task_name), members in by_sweep.items():
        table = next(t for t in doc_tables if t["task"] == task_name)
        rows = {row["run"]: row for row in table["rows"] if row.get("sweep") == where}
        assert members[0].swept is not None
        keys = [k for k in members[0].swept if k != sweep.SEED]
        # the resolved values, not the override texts: "1e-3" is a string to YAML, 1e-3 a number
        # to the recipe, and a number may be written several ways (8, 8.0)
        values = {run.name: {k: sweep.value_at(recipe.to_dict(run.recipe), k) for k in keys}
                  for run in members}  # fmt: skip
        for key in keys:
            found = [values[run.name][key] for run in members]
            if not all(_number(x) for x in found):  # a list is not even hashable: test first
                logger.info("%s: %s is not a number in every run, so no curve", where, key)
                continue
            xs = sorted(set(found))
            lines: dict[str, dict[float, dict[str, Any]]] = {}
            for run in members:
                assert run.swept is not None
                label = ", ".join(f"{k}={run.swept[k]}" for k in keys if k != key) or run.mode
                lines.setdefault(label, {})[values[run.name][key]] = rows[run.group or "(all)"]
            for name in table["columns"]:
                out.append({
                    "sweep": where, "task": task_name, "key": key, "metric": name, "x": xs,
                    "lines": [{"label": label, "points": [_point(x, row, name)
                                                          for x, row in sorted(points.items())]}
                              for label, points in lines.items()],
                })  # fmt: skip
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _point(x: float, row: dict[str, Any], name: str) -> dict[str, Any]:
    """One point of a curve from its table row; `bars`: "interval" (the bootstrap interval of
    the seeds' mean), "std" (mean ± std over seeds) or None (one run without samples)."""
    mean, ci, std = row.get(name), row.get(f"{name}_ci"), row.get(f"{name}_std")
    low = high = mean
    bars = None
    if mean is not None and ci is not None:
        (low, high), bars = ci, "interval"
    elif mean is not None and std is not None:
        low, high, bars = mean - std, mean + std, "std"
    return {"x": x, "mean": mean, "low": low, "high": high, "n_seeds": row.get("n", 1),
            "bars": bars}  # fmt: skip


def line_label(line: dict[str, Any]) -> str:
    """A line's label, saying where its bars are the spread over seeds, not an interval."""
    std = any(p["bars"] == "std" for p in line["points"])
    return line["label"] + (" (± std over seeds)" if std else "")


def curves_markdown(entries: list[dict[str, Any]]) -> str:
    """Each curve as a table: a row per line, a column per value of the swept key."""
    out = []
    for e in entries:
        m = metric(e["metric"])
        head = ["line", *(f"`{e['key']}`={x:g}" for x in e["x"])]
        lines = [f"#### {m.title} against `{e['key']}` ({Path(e['sweep']).name})", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for line in e["lines"]:
            cells = [line_label(line)]
            points = {p["x"]: p for p in line["points"]}
            for x in e["x"]:
                p = points.get(x)
                if p is None or p["mean"] is None:
                    cells.append("-")
                    continue
                text = m.format(p["mean"])
                if p["bars"] == "interval":
                    text += " [{}, {}]".format(m.format(p["low"]), m.format(p["high"]))
                elif p["bars"] == "std":
                    text += f" ± {m.format(p['high'] - p['mean'])}"
                cells.append(f"{text} (n={p['n_seeds']})")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Figure: `{e.get('png')}`. n: seeds averaged; [low, high]: the bootstrap "
                  "interval of their mean over the images; ±: the standard deviation over "
                  "seeds, where a run kept no per-sample values.", ""]  # fmt: skip
        out.append("\n".join(lines))
    return "\n".join(out)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None

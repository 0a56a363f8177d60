"""The results tables: best values by each metric's direction, formatting, missing metrics, one
table per task with its reference row, a sweep's seeds folded into one row (mean, sample std)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DEBUG_RECIPE
from toolkit.core import stats
from toolkit.core.errors import UserError
from toolkit.reporting.tables import Run, best, markdown, markdown_all, read_runs, tables
from toolkit.reporting.write import report
from toolkit.runs import recipe

ROOT = Path(__file__).resolve().parents[2]


def row(run: str | None, mode: str, mse: float | None, psnr: float | None, ssim: float | None):
    return {"run": run, "mode": mode, "mse": mse, "psnr": psnr, "ssim": ssim,
            "trainable": 10 if run else None, "epochs": 2.5 if run else None,
            "init_from": "runs/pre" if run else None, "images_per_s": 12.345 if run else None,
            "split": "val", "count": 7}  # fmt: skip


ROWS = [
    row("a", "frozen MAE", 0.002, 31.0, 0.95),
    row("b", "full finetune", 0.001, 33.0, 0.94),
    row("c", "EDSR", None, None, None),
    row(None, "bicubic", 0.003, 30.0, 0.96),
]
COLUMNS = ["mse", "psnr", "ssim"]
TABLE = {"task": "sr", "title": "super-resolution", "columns": COLUMNS, "rows": ROWS,
         "best": best(ROWS, COLUMNS)}  # fmt: skip


def test_best_follows_each_metrics_direction_ignoring_missing_values() -> None:
    assert best(ROWS, COLUMNS) == {"mse": 0.001, "psnr": 33.0, "ssim": 0.96}
    losses = [{"loss": 0.5}, {"loss": 0.2}, {"loss": None}]
    assert best(losses, ["loss"]) == {"loss": 0.2}  # a loss is best when lowest


def test_markdown_bolds_each_best_once_and_formats_the_rest() -> None:
    lines = markdown(TABLE).splitlines()
    assert lines[0] == ("| Mode | MSE | PSNR (dB) | SSIM | trainable params | epochs | init from "
                        "| train img/s |")  # fmt: skip
    assert lines[2] == "| frozen MAE (`a`) | 0.002000 | 31.00 | 0.9500 | 10 | 2.5 | `pre` | 12.3 |"
    assert lines[3] == (
        "| full finetune (`b`) | **0.001000** | **33.00** | 0.9400 | 10 | 2.5 | `pre` | 12.3 |"
    )
    assert lines[4] == "| EDSR (`c`) | - | - | - | 10 | 2.5 | `pre` | 12.3 |"
    assert lines[5] == "| bicubic | 0.003000 | 30.00 | **0.9600** | - | - | - | - |"
    assert lines[-1] == "val split, 7 images; bicubic: the reference, on the same inputs."


def test_a_runs_speed_is_the_median_of_its_log_windows_after_the_first() -> None:
    r = recipe.load(ROOT / "recipes/baselines/edsr.yaml")
    logged = [{"step": 0}, {"train/images_per_s": 3.0}, {"train/images_per_s": 20.0},
              {"epoch": 1.0}, {"train/images_per_s": 10.0},
              {"train/images_per_s": 30.0}]  # fmt: skip
    assert Run(Path("runs/x"), r, {}, logged).images_per_s == 20.0  # 3.0 (start-up) left out
    assert Run(Path("runs/x"), r, {}, logged[:2]).images_per_s == 3.0  # the only window
    assert Run(Path("runs/x"), r, {}, [{"epoch": 1.0}]).images_per_s is None


def run_of(name: str, path: str, ev: dict, overrides: tuple[str, ...] = ()) -> Run:
    r = recipe.load(ROOT / path, list(overrides))
    return Run(Path("runs") / name, r, {"split": "val", "count": 7, **ev}, [{"epoch": 1.0}])


def test_one_table_per_task_each_with_its_reference() -> None:
    ref = {"mse": 0.003, "psnr": 30.0, "ssim": 0.9}
    runs = [
        run_of("pre", "recipes/pretrain.yaml", {"model": {"loss": 0.4}, "bicubic": None}),
        run_of(
            "edsr",
            "recipes/baselines/edsr.yaml",
            {"model": {"mse": 0.001, "psnr": 33.0, "ssim": 0.95, "loss": 0.1}, "bicubic": ref},
        ),
        run_of(
            "ft",
            "recipes/finetune.yaml",
            {"model": {"mse": 0.002, "psnr": 31.0, "ssim": 0.94, "loss": 0.2}, "bicubic": ref},
        ),
    ]
    mae, sr = tables(runs)
    assert (mae["task"], mae["columns"]) == ("mae", ["loss"])
    assert [r["mode"] for r in mae["rows"]] == ["MAE pretrain"]  # no reference for the MAE
    assert mae["best"] == {"loss": 0.4}
    assert [r["mode"] for r in sr["rows"]] == ["EDSR", "full finetune", "bicubic"]
    assert sr["rows"][-1]["psnr"] == 30.0 and sr["rows"][-1]["run"] is None
    assert sr["rows"][0]["trainable"] == 6_643_713  # the recipe's model, counted
    text = markdown_all({"tables": [mae, sr]})
    assert "### masked-autoencoder pretraining (`mae`)" in text
    assert "### super-resolution (`sr`)" in text and "| **33.00** |" in text


def test_a_run_without_a_label_is_named_by_architecture_and_freeze() -> None:
    r = run_of("x", "recipes/finetune_frozen_encoder.yaml", {"model": {}}, ("label=null",))
    assert r.mode == "SR-MAE, frozen encoder"
    assert run_of("y", "recipes/baselines/rcan.yaml", {"model": {}}, ("label=null",)).mode == "RCAN"


# MAE pretraining runs' final losses, per learning rate and seed. Spread apart so that the sample
# std (n - 1) and the population std (n) differ by sqrt(3/2) - 1, 22%, at n = 3.
LOSSES = {
    ("1e-3", "0"): 0.40,
    ("1e-3", "1"): 0.10,
    ("1e-3", "2"): 0.25,
    ("1e-2", "0"): 0.90,
    ("1e-2", "1"): 0.30,
    ("1e-2", "2"): 0.45,
}


def sweep_dir(base: Path, losses: dict[tuple[str, str], float]) -> Path:
    """A sweep over optim.lr x train.seed as `launch --sweep` leaves it: sweep.json, and per
    variant a run directory with the resolved recipe.yaml, eval.json and metrics.jsonl."""
    variants = []
    for index, ((lr, seed), loss) in enumerate(losses.items()):
        overrides = [f"optim.lr={lr}", f"train.seed={seed}"]
        name = ",".join(overrides)
        variants.append({"index": index, "name": name, "overrides": overrides})
        run = base / name
        run.mkdir(parents=True)
        r = recipe.load(DEBUG_RECIPE, [*overrides, f"run.dir={run}"])
        (run / "recipe.yaml").write_text(recipe.dump(r))
        ev = {"split": "val", "count": 6, "model": {"loss": loss}, "bicubic": None}
        (run / "eval.json").write_text(json.dumps(ev))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 6, "epoch": 1.0}) + "\n")
    axes = {"optim.lr": ["1e-3", "1e-2"], "train.seed": ["0", "1", "2"]}
    doc = {"recipe": str(DEBUG_RECIPE), "axes": axes, "variants": variants, "array": None}
    (base / "sweep.json").write_text(json.dumps(doc))
    return base


def test_a_sweeps_seeds_fold_into_one_row_with_mean_sample_std_and_n(tmp_path: Path) -> None:
    """Runs of a sweep that differ only in train.seed are one row (mean, sample standard
    deviation with n - 1, and n); runs that differ in another swept key (optim.lr) stay apart."""
    runs = read_runs(sweep_dir(tmp_path / "sweep", LOSSES))
    assert len(runs) == 6
    (table,) = tables(runs)
    rows = {row["run"]: row for row in table["rows"]}
    assert set(rows) == {"optim.lr=1e-3", "optim.lr=1e-2"}  # no reference row for the MAE
    for lr in ("1e-3", "1e-2"):
        values = [LOSSES[(lr, seed)] for seed in ("0", "1", "2")]
        row = rows[f"optim.lr={lr}"]
        assert row["n"] == 3
        # The same three numbers summed in another order: float rounding only.
        assert row["loss"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert row["loss_std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert row["loss_std"] != pytest.approx(statistics.pstdev(values), rel=0.1)
    assert table["best"] == {"loss": pytest.approx(0.25, rel=1e-12)}  # the lower mean loss
    lines = markdown(table).splitlines()
    mean, std = statistics.mean([0.40, 0.10, 0.25]), statistics.stdev([0.40, 0.10, 0.25])
    assert f"(`optim.lr=1e-3`, 3 seeds) | **{mean:.6f}** ± {std:.6f} |" in lines[2]


def test_two_sweeps_with_the_same_swept_values_are_two_rows_each(tmp_path: Path) -> None:
    """The grouping is per sweep directory: the same override in two sweeps (another recipe,
    another day) is not averaged across them."""
    one = sweep_dir(tmp_path / "one", LOSSES)
    two = sweep_dir(tmp_path / "two", {k: v + 1 for k, v in LOSSES.items()})
    (table,) = tables([*read_runs(one), *read_runs(two)])
    assert [(row["run"], row["n"]) for row in table["rows"]] == [
        ("optim.lr=1e-3", 3),
        ("optim.lr=1e-2", 3),
    ] * 2
    # means of three numbers: float rounding only
    assert [row["loss"] for row in table["rows"]] == pytest.approx(
        [0.25, 0.55, 1.25, 1.55], rel=1e-12
    )


# --- intervals and paired differences, from the per-sample values beside eval.json ------------


def sr_run(base: Path, name: str, path: str, psnr: np.ndarray, keys: list[str]) -> Run:
    """An SR run directory as evaluate leaves it: eval.json naming eval.samples.npz, whose
    values (the model's, and bicubic's 1 dB below a fixed 30 dB) are written here."""
    run = base / name
    run.mkdir()
    mse = 10 ** (-psnr / 10)
    bicubic = np.full(len(keys), 30.0) + np.arange(len(keys)) % 3
    parts = {
        "model": {"psnr": psnr, "mse": mse, "ssim": psnr / 40, "loss": mse},
        "bicubic": {"psnr": bicubic, "mse": 10 ** (-bicubic / 10), "ssim": bicubic / 40},
    }
    stats.Samples.of(keys, parts).write(run / "eval.samples.npz")
    means = {p: {k: float(np.mean(v)) for k, v in vs.items()} for p, vs in parts.items()}
    ev = {"model": means["model"], "reference": "bicubic", "bicubic": means["bicubic"],
          "samples": "eval.samples.npz"}  # fmt: skip
    return dataclasses.replace(run_of(name, path, ev), dir=run)


def test_rows_get_intervals_and_pairs_their_differences_by_key(tmp_path: Path) -> None:
    keys = [f"k{i:02d}" for i in range(40)]
    rng = np.random.default_rng(0)
    base = 32 + rng.gamma(2.0, 1.0, 40)  # each image's difficulty, shared by both runs
    a = sr_run(tmp_path, "a", "recipes/finetune.yaml", base + 0.5, keys)
    # b's values listed in another key order (as 2 processes gather them): paired by key
    shuffled = rng.permutation(40)
    b = sr_run(tmp_path, "b", "recipes/baselines/edsr.yaml", (base + 0.49)[shuffled],
               [keys[i] for i in shuffled])  # fmt: skip
    other = sr_run(tmp_path, "c", "recipes/baselines/rcan.yaml", base, [f"x{i}" for i in range(40)])
    (table,) = tables([a, b, other])
    rows = {row["run"]: row for row in table["rows"]}
    for name, values in (("a", base + 0.5), ("b", base + 0.49)):
        low, high = rows[name]["psnr_ci"]
        mean = values.mean()
        assert low < mean < high and high - low > 0.1  # 40 images of 1.4 dB spread
        # the interval of that run's own values, whatever order they were written in
        want = stats.bootstrap(stats.mean_statistic(values[:, None]), 40)
        assert [low, high] == pytest.approx([want.low[0], want.high[0]], abs=1e-12)
    pairs = {(p["a"], p["b"]): p for p in table["pairs"]}
    # best by PSNR: a; b paired against it; c was evaluated on other images: not paired
    ab = pairs[("EDSR (`b`)", "full finetune (`a`)")]
    assert ab["psnr"]["diff"] == pytest.approx(-0.01, abs=1e-9)
    # the same 0.01 dB on every image: every resample differs by exactly that, a paired
    # interval of zero width (unpaired it would be ~1 dB wide)
    assert ab["psnr"]["ci"] == pytest.approx([-0.01, -0.01], abs=1e-9)
    assert ab["psnr"]["significant"]
    assert not any("`c`" in p["a"] or "`c`" in p["b"] for p in table["pairs"])
    assert ("full finetune (`a`)", "bicubic") in pairs and ("EDSR (`b`)", "bicubic") in pairs
    text = markdown(table)
    low, high = rows["a"]["psnr_ci"]
    assert f"| **{(base + 0.5).mean():.2f}** [{low:.2f}, {high:.2f}] |" in text
    assert "| EDSR (`b`) - full finetune (`a`) | " in text and "-0.01 [-0.01, -0.01]" in text


def test_a_difference_whose_interval_holds_zero_is_marked_not_significant(tmp_path) -> None:
    keys = [f"k{i}" for i in range(30)]
    noise = np.random.default_rng(1).normal(0, 0.3, (2, 30))
    a = sr_run(tmp_path, "a", "recipes/finetune.yaml", 33 + noise[0], keys)
    b = sr_run(tmp_path, "b", "recipes/baselines/edsr.yaml", 33 + noise[1], keys)
    (table,) = tables([a, b])
    pair = table["pairs"][0]  # the run that is not best against the best
    assert {pair["a"], pair["b"]} == {"full finetune (`a`)", "EDSR (`b`)"}
    low, high = pair["psnr"]["ci"]
    assert low < 0 < high and not pair["psnr"]["significant"]
    assert pair["psnr"]["diff"] == pytest.approx(
        (noise[1] - noise[0]).mean() * (1 if pair["a"].startswith("EDSR") else -1), abs=1e-12
    )
    (line,) = [
        x for x in markdown(table).splitlines() if x.startswith(f"| {pair['a']} - {pair['b']} |")
    ]
    assert line.count(" n.s.") == 3  # MSE, PSNR and SSIM alike


def test_a_seed_groups_interval_is_that_of_the_mean_over_its_seeds(tmp_path: Path) -> None:
    """Repeats with train.seed: mean ± std over seeds, and the interval of the seeds' mean on
    the same resamples of the images."""
    losses = {("1e-3", "0"): 0.40, ("1e-3", "1"): 0.10, ("1e-3", "2"): 0.25}
    sweep = sweep_dir(tmp_path / "sweep", losses)
    keys = [f"s{i:02d}" for i in range(12)]  # sorted as listed: the draws index sorted keys
    per_sample = {}
    for i, ((lr, seed), loss) in enumerate(losses.items()):
        values = loss + np.random.default_rng(i).normal(0, 0.05, 12)
        per_sample[seed] = values
        run = sweep / f"optim.lr={lr},train.seed={seed}"
        stats.Samples.of(keys, {"model": {"loss": values}}).write(run / "eval.samples.npz")
        ev = json.loads((run / "eval.json").read_text())
        (run / "eval.json").write_text(json.dumps({**ev, "samples": "eval.samples.npz"}))
    (table,) = tables(read_runs(sweep))
    (row,) = table["rows"]
    seed_mean = np.mean(list(per_sample.values()), axis=0)
    want = stats.bootstrap(stats.mean_statistic(seed_mean[:, None]), 12)
    # a mean of means against a mean of the per-image means: float rounding only
    assert row["loss_ci"] == pytest.approx([want.low[0], want.high[0]], abs=1e-12)
    assert row["n"] == 3 and row["loss_std"] > 0.1
    mean, std = row["loss"], row["loss_std"]
    low, high = row["loss_ci"]
    assert f"**{mean:.6f}** ± {std:.6f} [{low:.6f}, {high:.6f}] |" in markdown(table)


# --- curves over a numeric swept key -------------------------------------------------------------

# MAE runs' final losses over data.limit x init.from x train.seed (2 x 2 x 2).
CURVE_LOSSES = {
    ("8", "runs/pre_a", "0"): 0.60,
    ("8", "runs/pre_a", "1"): 0.50,
    ("32", "runs/pre_a", "0"): 0.30,
    ("32", "runs/pre_a", "1"): 0.20,
    ("8", "runs/pre_b", "0"): 0.70,
    ("8", "runs/pre_b", "1"): 0.40,
    ("32", "runs/pre_b", "0"): 0.35,
    ("32", "runs/pre_b", "1"): 0.15,
}
CURVE_KEYS = [f"c{i:02d}" for i in range(10)]  # sorted as listed: the draws index sorted keys


def curve_sweep(base: Path) -> dict[str, np.ndarray]:
    """The sweep as `launch --sweep data.limit=8,32 --sweep init.from=runs/pre_a,runs/pre_b
    --sweep train.seed=0,1` leaves it; the runs from runs/pre_a keep per-sample values (their
    points get the bootstrap interval), those from runs/pre_b do not (mean ± std over seeds).
    Returns the per-sample values written, by run directory name."""
    axes = {"data.limit": ["8", "32"], "init.from": ["runs/pre_a", "runs/pre_b"],
            "train.seed": ["0", "1"]}  # fmt: skip
    variants = []
    samples = {}
    for index, combo in enumerate(itertools.product(*axes.values())):
        overrides = [f"{k}={v}" for k, v in zip(axes, combo, strict=True)]
        name = ",".join(overrides).replace("/", "_")
        variants.append({"index": index, "name": name, "overrides": overrides})
        run = base / name
        run.mkdir(parents=True)
        r = recipe.load(DEBUG_RECIPE, [*overrides, f"run.dir={run}"])
        (run / "recipe.yaml").write_text(recipe.dump(r))
        loss = CURVE_LOSSES[combo]
        ev = {"split": "val", "count": 10, "model": {"loss": loss}, "bicubic": None}
        if combo[1] == "runs/pre_a":
            values = loss + np.random.default_rng(index).normal(0, 0.05, 10)
            stats.Samples.of(CURVE_KEYS, {"model": {"loss": values}}).write(run / "s.npz")
            samples[name] = values
            ev["samples"] = "s.npz"
        (run / "eval.json").write_text(json.dumps(ev))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 6, "epoch": 1.0}) + "\n")
    doc = {"recipe": str(DEBUG_RECIPE), "axes": axes, "variants": variants, "array": None}
    (base / "sweep.json").write_text(json.dumps(doc))
    return samples


def test_a_numeric_swept_key_draws_each_metric_with_a_line_per_other_value(tmp_path) -> None:
    """report SWEEP_DIR: the loss against data.limit, one line per init.from, each point the
    mean over the seed runs' eval.json values with its bars; init.from (a path) draws none."""
    samples = curve_sweep(tmp_path / "sweep")
    doc = report([tmp_path / "sweep"], tmp_path / "out", samples=1)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["curves"] == json.loads(json.dumps(doc["curves"]))
    (curve,) = written["curves"]  # the MAE table has one metric; no curve over init.from
    assert (curve["key"], curve["metric"], curve["x"]) == ("data.limit", "loss", [8, 32])
    # each point says what its bars are; the table and legend say it of the line
    assert [line["label"] for line in curve["lines"]] == ["init.from=runs/pre_a",
                                                          "init.from=runs/pre_b"]  # fmt: skip
    for line, init in zip(curve["lines"], ("runs/pre_a", "runs/pre_b"), strict=True):
        assert [p["x"] for p in line["points"]] == [8, 32]
        for point, limit in zip(line["points"], ("8", "32"), strict=True):
            names = [f"data.limit={limit},init.from={init.replace('/', '_')},train.seed={s}"
                     for s in ("0", "1")]  # fmt: skip
            evals = [json.loads((tmp_path / "sweep" / n / "eval.json").read_text()) for n in names]
            losses = [ev["model"]["loss"] for ev in evals]
            assert point["n_seeds"] == 2
            assert point["mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
            if init == "runs/pre_b":  # no per-sample values: mean ± sample std over seeds
                spread = statistics.stdev(losses)
                assert point["bars"] == "std" and spread > 0.1
                assert [point["low"], point["high"]] == pytest.approx(
                    [statistics.mean(losses) - spread, statistics.mean(losses) + spread], rel=1e-12
                )
            else:  # the bootstrap interval of the two seeds' mean over the images
                seed_mean = np.mean([samples[n] for n in names], axis=0)
                want = stats.bootstrap(stats.mean_statistic(seed_mean[:, None]), 10)
                assert point["bars"] == "interval"
                assert [point["low"], point["high"]] == pytest.approx(
                    [want.low[0], want.high[0]], abs=1e-12
                )
                assert point["low"] < point["mean"] < point["high"]
    png = (tmp_path / "out" / curve["png"]).read_bytes()
    assert curve["png"] == "curve_data.limit.png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    # one panel of the house size: 5.5 x 4.5 inches at 100 dpi (the IHDR's width, height)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (550, 450)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "#### val loss against `data.limit` (sweep)" in md
    b8 = curve["lines"][1]["points"][0]
    want_cell = f"{b8['mean']:.6f} ± {b8['high'] - b8['mean']:.6f} (n=2)"
    assert f"| init.from=runs/pre_b (± std over seeds) | {want_cell} |" in md


def test_a_pair_asked_for_is_added_and_an_unknown_name_refused(tmp_path: Path) -> None:
    """`report --pair b:d`: neither is the best run, so only the pair asked for compares them
    (a pretrained run against its own control from scratch); a name of no run is refused."""
    keys = [f"k{i}" for i in range(30)]
    base = 32 + np.random.default_rng(2).gamma(2.0, 1.0, 30)
    a = sr_run(tmp_path, "a", "recipes/finetune.yaml", base + 1.0, keys)
    b = sr_run(tmp_path, "b", "recipes/baselines/edsr.yaml", base + 0.25, keys)
    d = sr_run(tmp_path, "d", "recipes/baselines/rcan.yaml", base, keys)
    (plain,) = tables([a, b, d])
    assert not any(p["a"] == "EDSR (`b`)" and p["b"] == "RCAN (`d`)" for p in plain["pairs"])
    (table,) = tables([a, b, d], [("b", "d")])
    (bd,) = [p for p in table["pairs"] if (p["a"], p["b"]) == ("EDSR (`b`)", "RCAN (`d`)")]
    # 0.25 dB on every image: the difference, and every resample's
    assert bd["psnr"]["diff"] == pytest.approx(0.25, abs=1e-9)
    assert bd["psnr"]["ci"] == pytest.approx([0.25, 0.25], abs=1e-9)
    assert len(table["pairs"]) == len(plain["pairs"]) + 1
    with pytest.raises(UserError, match=r"^--pair b:x: no run 'x' among "):
        tables([a, b, d], [("b", "x")])


def test_a_power_ratio_is_best_nearest_one() -> None:
    rows = [{"power_high": 0.7}, {"power_high": 1.2}, {"power_high": 0.9}, {"power_high": None}]
    assert best(rows, ["power_high"]) == {"power_high": 0.9}  # neither highest nor lowest


def test_the_physics_table_has_a_row_per_run_that_computed_it_and_the_references() -> None:
    """A run evaluated before the physics-aware metrics keeps its row in the main table and has
    none in the physics table; with no such run there is no physics table at all."""
    from toolkit.tasks.sr import PHYSICS

    physics = {k: 0.5 + i / 10 for i, k in enumerate(PHYSICS)}
    ref = {"mse": 0.003, "psnr": 30.0, "ssim": 0.9, **{k: v / 2 for k, v in physics.items()}}
    model = {"mse": 0.001, "psnr": 33.0, "ssim": 0.95, "loss": 0.1}
    new = run_of("new", "recipes/baselines/edsr.yaml", {"model": {**model, **physics},
                                                        "bicubic": ref})  # fmt: skip
    old = run_of("old", "recipes/finetune.yaml", {"model": model, "bicubic": ref})
    (sr,) = tables([new, old])
    assert [r["run"] for r in sr["rows"]] == ["new", "old", None]
    (more,) = sr["more"]
    assert more["name"] == "physics" and more["columns"] == list(PHYSICS)
    assert [r["run"] for r in more["rows"]] == ["new", None]
    assert [more["rows"][0][k] for k in PHYSICS] == [physics[k] for k in PHYSICS]
    assert [more["rows"][1][k] for k in PHYSICS] == [ref[k] for k in PHYSICS]
    assert "**super-resolution: physics** (" in markdown(sr)
    (sr,) = tables([old])
    assert sr["more"] == [] and "physics" not in markdown(sr)

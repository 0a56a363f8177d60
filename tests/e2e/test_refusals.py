"""Input that does not fit a command is refused, not mangled: one `error:` line naming the file,
the key and what was expected, exit status 2, no traceback, and nothing written or changed
(the run directory's files compared byte for byte before and after). Each case here was a
traceback or a silently wrong result before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    DEBUG_RECIPE,
    ROOT,
    make_pairs,
    make_run,
    one_error_line,
    tiny,
    tree_digest,
)
from toolkit import evaluate, launch, report, train
from toolkit.data.sharding import shard

CNN = ROOT / "recipes" / "classify" / "cnn.yaml"
# A 3-class CNN small enough to build in milliseconds on 32x32 images.
TINY_CNN = ("model.img_size=32", "model.channels=4", "model.depth=1", "data.batch_size=4",
            "data.num_workers=0", "train.precision=no", "deepspeed=null")  # fmt: skip


def refused(capsys: pytest.CaptureFixture[str], command: object, *args: object) -> str:
    """Run a command's main in this process; it must refuse: exit 2, one line, no traceback."""
    assert command.main([str(a) for a in args]) == 2  # type: ignore[attr-defined]
    return one_error_line(capsys.readouterr().err)


def images(root: Path, count: int, scale: float = 1.0, offset: float = 0.0, size: int = 32) -> Path:
    """`count` random images, HR only, values spanning `offset + scale * [0, 1]` exactly."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = rng.uniform(size=(size, size)).astype(np.float32)
        a[0, :2] = 0.0, 1.0
        np.save(root / f"{i:03d}.npy", (offset + scale * a).astype(np.float32))
    return root


def labelled(root: Path, classes: tuple[str, ...], scale: float = 1.0, offset: float = 0.0) -> Path:
    for c in classes:
        images(root / c, 20, scale, offset)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of several kinds: unlabelled, 3 and 4 classes, other class names, physical
    units, pairs at scale 2 and 4."""
    root = tmp_path_factory.mktemp("refusals")
    shard(images(root / "src/plain", 12), root / "plain", val_fraction=0.3)
    for name, classes in (("cls3", ("a", "b", "c")), ("cls4", ("a", "b", "c", "d")),
                          ("xyz", ("x", "y", "z"))):  # fmt: skip
        shard(labelled(root / f"src/{name}", classes), root / name, val_fraction=0.4, labels=True)
    counts = labelled(root / "src/counts", ("a", "b", "c"), scale=4000, offset=82)
    shard(counts, root / "counts", val_fraction=0.4, labels=True)
    shard(images(root / "src/flux", 12, scale=4000, offset=82), root / "flux", val_fraction=0.3)
    make_pairs(root / "src/x2", 12)
    shard(root / "src/x2", root / "x2", val_fraction=0.3)
    x4 = root / "src/x4"
    for side, size in (("hr", 32), ("lr", 8)):
        images(x4 / side, 12, size=size)
    shard(x4, root / "x4", val_fraction=0.3)
    return root


def test_a_classifier_on_shards_without_labels_is_refused_before_it_trains(
    data: Path, tmp_path: Path, capsys
) -> None:
    """It died with a RuntimeError traceback ("no readable sample left") after writing its
    run directory."""
    run = tmp_path / "run"
    line = refused(capsys, launch, CNN, "--local", f"data.shards={data / 'plain'}",
                   f"run.dir={run}", *TINY_CNN)  # fmt: skip
    assert f"{data / 'plain' / 'manifest.json'}: the shards carry no label" in line
    assert "the classify task needs" in line and "--labels" in line
    assert not run.exists()
    # The same check when a job's processes are started without the launcher (srun, torchrun).
    line = refused(capsys, train, CNN, f"data.shards={data / 'plain'}", f"run.dir={run}", *TINY_CNN)
    assert "the shards carry no label" in line and not run.exists()


@pytest.mark.parametrize(
    ("shards", "override", "expected"),
    [
        ("cls3", "data.per_class=100", "data.per_class: 100 train samples of each class, but in"),
        ("cls3", "data.limit=1000", "data.limit: 1000 is more than the"),
        ("plain", "data.per_class=2", "holds no class labels: shard class folders with --labels"),
    ],
)
def test_a_subset_the_shards_cannot_give_is_refused_before_training(
    data: Path, tmp_path: Path, capsys, shards: str, override: str, expected: str
) -> None:
    """A class smaller than data.per_class, a limit past the train split, per_class on shards
    without labels: one line naming the manifest and the key, nothing written."""
    run = tmp_path / "run"
    task = "task=classify" if shards == "cls3" else "task=mae"
    recipe_file = CNN if shards == "cls3" else DEBUG_RECIPE
    extra = TINY_CNN if shards == "cls3" else ("data.num_workers=0",)
    line = refused(capsys, launch, recipe_file, "--local", f"data.shards={data / shards}",
                   f"run.dir={run}", task, *extra, override)  # fmt: skip
    assert expected in line and str(data / shards / "manifest.json") in line
    assert not run.exists()
    # a dry run says so among its warnings
    args = [recipe_file, "--local", "--dry-run", f"data.shards={data / shards}", f"run.dir={run}",
            task, *extra, override]  # fmt: skip
    assert launch.main([str(a) for a in args]) == 0
    assert f"  - {line.removeprefix('error: ')}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("classes", [2, 5])
def test_a_classifier_with_another_number_of_classes_is_refused(
    data: Path, tmp_path: Path, capsys, classes: int
) -> None:
    """num_classes 2 on 3 classes was an IndexError traceback; 5 trained a model with two
    classes that never occur, and tables named them '3' and '4'."""
    run = tmp_path / "run"
    line = refused(capsys, launch, CNN, "--local", f"data.shards={data / 'cls3'}",
                   f"run.dir={run}", *TINY_CNN, f"model.num_classes={classes}")  # fmt: skip
    assert "the shards hold 3 classes (a, b, c)" in line
    assert f"model.num_classes is {classes}: set model.num_classes=3" in line
    assert not run.exists()


def classify_run(tmp_path: Path, data: Path, normalise: str = "unit") -> Path:
    """A 3-class CNN run on `cls3`, as a training leaves it (weights, recipe, data.json)."""
    run = make_run(tmp_path / "cnn", f"data.shards={data / 'cls3'}",
                   f"data.normalise={normalise}", *TINY_CNN, base=CNN)  # fmt: skip
    record = {"value_range": [0.0, 1.0], "normalise": normalise, "classes": ["a", "b", "c"]}
    (run / "data.json").write_text(json.dumps(record))
    return run


@pytest.mark.parametrize(
    ("shards", "expected"),
    [
        ("plain", "the shards carry no label"),
        ("cls4", "the shards hold 4 classes (a, b, c, d), but model.num_classes is 3"),
        ("xyz", "the shards' classes are x, y, z, but the run was trained on a, b, c"),
        ("counts", "data.normalise unit says values lie in [0, 1], but they span 82 to 4082"),
    ],
)
def test_evaluating_on_shards_that_do_not_fit_the_run_is_refused(
    data: Path, tmp_path: Path, capsys, shards: str, expected: str
) -> None:
    """Other shards than the run's: without labels (a traceback), with a fourth class (an
    IndexError), with other class names (the confusion matrix mislabelled), in physical
    units for a model trained on [0, 1] (a PSNR of -67 dB written as a result)."""
    run = classify_run(tmp_path, data)
    before = tree_digest(run)
    line = refused(capsys, evaluate, run, "--shards", data / shards)
    assert expected in line and str(data / shards / "manifest.json") in line
    assert tree_digest(run) == before


def test_evaluating_on_values_beyond_the_training_range_is_refused(
    data: Path, tmp_path: Path, capsys
) -> None:
    """A run trained on values 0 to 1 under `none` (no clamp, no per-image map) scores counts
    it never saw; its data.json says what it saw, and the line says what maps one to the other."""
    run = classify_run(tmp_path, data, "none")
    line = refused(capsys, evaluate, run, "--shards", data / "counts")
    assert "values 82 to 4082, but" in line and "trained on values 0 to 1" in line
    assert "`data.normalise=minmax` (or percentile) maps each image to [0, 1]" in line
    assert evaluate.main([str(run), "--shards", str(data / "counts"), "data.normalise=minmax"]) == 0


def test_an_sr_run_is_refused_shards_of_another_scale(data: Path, tmp_path: Path, capsys) -> None:
    """Pairs at x4 under data.scale 2 were a RuntimeError traceback after a run directory was
    written; evaluating a x2 run on them, the same."""
    run = tmp_path / "run"
    line = refused(capsys, launch, DEBUG_RECIPE, "--local", *tiny(data / "x4", run))
    assert "LR at 1/4 of its side (scale 4), but data.scale is 2: set data.scale=4" in line
    assert not run.exists()
    sr = make_run(tmp_path / "sr", *tiny(data / "x2", tmp_path / "sr"))
    before = tree_digest(sr)
    line = refused(capsys, evaluate, sr, "--shards", data / "x4")
    assert "(scale 4), but data.scale is 2" in line and tree_digest(sr) == before


def test_unit_normalisation_on_data_beyond_0_1_is_refused(
    data: Path, tmp_path: Path, capsys
) -> None:
    """A recipe saying `unit` for counts would clamp every value to 1 and train on a blank."""
    run = tmp_path / "run"
    line = refused(capsys, launch, DEBUG_RECIPE, "--local",
                   *tiny(data / "flux", run, "data.normalise=unit", task="mae"))  # fmt: skip
    assert "data.normalise unit says values lie in [0, 1], but they span 82 to 4082" in line
    assert "(the shards' own is none)" in line and not run.exists()
    assert launch.main([str(DEBUG_RECIPE), "--dry-run", *tiny(data / "flux", run, task="mae")]) == 0


def test_a_run_directory_that_is_a_file_or_a_folder_of_other_things_is_refused(
    data: Path, tmp_path: Path, capsys
) -> None:
    """A run was written into a data folder among its files; a file as run.dir was a
    FileExistsError traceback; so was a file as report --out."""
    folder = images(tmp_path / "raw", 2)
    before = tree_digest(folder)
    line = refused(capsys, launch, DEBUG_RECIPE, "--local", *tiny(data / "x2", folder))
    assert f"run.dir: {folder} holds 000.npy, 001.npy and no run" in line
    assert tree_digest(folder) == before
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    line = refused(capsys, launch, DEBUG_RECIPE, "--local", *tiny(data / "x2", file))
    assert f"run.dir: {file} is a file, not a run directory" in line
    assert file.read_text() == "keep me\n"


def test_a_report_of_an_evaluation_of_another_task_is_refused(tmp_path: Path, capsys) -> None:
    """An SR run whose eval.json came from a classifier was reported as a classifier."""
    run = make_run(tmp_path / "sr", "task=sr", "model.arch=srmae", "model.sr_channels=8",
                   "train.loss=l1")  # fmt: skip
    (run / "eval.json").write_text(json.dumps({"task": "classify", "model": {"accuracy": 1.0}}))
    (run / "metrics.jsonl").write_text("")
    line = refused(capsys, report, run, "--out", tmp_path / "rep")
    assert "an evaluation of a classify model, but recipe.yaml describes a sr run" in line
    assert not (tmp_path / "rep").exists()
    (tmp_path / "taken").write_text("a file\n")
    ok = {"task": "sr", "model": {"loss": 0.1, "mse": 0.01, "psnr": 20.0, "ssim": 0.5}}
    (run / "eval.json").write_text(json.dumps(ok))
    line = refused(capsys, report, run, "--out", tmp_path / "taken")
    assert f"{tmp_path / 'taken'}: a file, not a folder to write into" in line


def test_init_from_a_run_of_another_model_leaves_no_run_directory(
    data: Path, tmp_path: Path, capsys
) -> None:
    """The refusal came after the run directory was made: an empty folder was left behind."""
    source = make_run(tmp_path / "cnn", f"data.shards={data / 'cls3'}", *TINY_CNN, base=CNN)
    run = tmp_path / "run"
    line = refused(capsys, launch, DEBUG_RECIPE, "--local",
                   *tiny(data / "x2", run, f"init.from={source}"))  # fmt: skip
    assert f"init.from {source}: no tensor of the checkpoint has a place in this model" in line
    assert not run.exists()


@pytest.mark.slow
def test_relaunching_a_run_with_another_model_changes_nothing(
    data: Path, tmp_path: Path, capsys
) -> None:
    """A finished SR run relaunched for more steps with another task, or another width, failed
    to load its checkpoint only after overwriting its recipe.yaml, so the run no longer
    evaluated; relaunched with the same steps and another width, it said "complete". Both are
    refused naming the difference, and the run keeps every byte; another mask ratio (the
    weights fit) trains on."""
    run = tmp_path / "run"
    args = tiny(data / "x2", run, "train.max_steps=2")
    assert launch.main([str(DEBUG_RECIPE), "--local", *args]) == 0
    before = tree_digest(run)
    for change, said in (
        ([f"data.shards={data / 'x2'}", f"run.dir={run}", "train.max_steps=4", "task=mae",
          "data.batch_size=4"], "task sr in the run, mae here"),
        ([*args, "model.embed_dim=48"], "(32, 1, 4, 4) in the run, (48, 1, 4, 4) here"),
        ([*args, "train.max_steps=4", "model.embed_dim=48"], "(48, 1, 4, 4) here"),
        ([*args, "train.max_steps=4", "data.limit=4"], "data.limit None in the run, 4 here"),
        ([*args, "train.max_steps=4", "data.holdout=0.5"],
         "data.holdout None in the run, 0.5 here"),
        ([*args, "train.max_steps=4", "optim.layer_decay=0.75"],
         "optim.layer_decay off in the run, per layer here"),
    ):  # fmt: skip
        line = refused(capsys, launch, DEBUG_RECIPE, "--local", *change)
        assert f"{run}: holds a run this recipe cannot continue (" in line and said in line
        assert "give this run its own run.dir" in line and tree_digest(run) == before
    assert launch.main([str(DEBUG_RECIPE), "--local", *args, "train.max_steps=3",
                        "model.mask_ratio=0.5"]) == 0  # fmt: skip
    assert (run / "checkpoints/step-00000003").is_dir()


def test_shard_refuses_what_its_files_turn_out_to_hold(tmp_path: Path, capsys) -> None:
    """What only reading the files shows, checked before anything is made visible: pairs of
    two scales (the loader skipped those of the other with a warning), a class whose files were
    all skipped (its count was 0, although classes must have samples), `--normalise unit` on
    counts (every value would be clamped to 1), other folders beside hr/ and lr/ (they were left
    out without a word). A pair whose LR is not its HR reduced by a whole factor is skipped and
    listed, like a corrupt file."""
    from toolkit import shard as shard_cli

    mixed = tmp_path / "mixed"
    make_pairs(mixed, 6)
    for i, size in ((6, 8), (7, 8), (8, 10)):  # two pairs at x4, one at 32/10
        images(mixed / "hr", 1, size=32).joinpath("000.npy").rename(mixed / "hr" / f"{i:04d}.npy")
        images(mixed / "lr", 1, size=size).joinpath("000.npy").rename(mixed / "lr" / f"{i:04d}.npy")
    line = refused(capsys, shard_cli, mixed, tmp_path / "out")
    assert f"{mixed}: hr/lr pairs of several scales (6 at scale 2, 2 at scale 4)" in line
    assert not (tmp_path / "out").exists()
    for i in (6, 7):
        (mixed / "lr" / f"{i:04d}.npy").unlink()
        (mixed / "hr" / f"{i:04d}.npy").unlink()
    assert shard_cli.main([str(mixed), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["scale"] == 2 and manifest["skipped"] == [
        {"path": "lr/0008.npy", "reason": "10x10: not its hr 32x32 reduced by one factor"}
    ]
    classes = labelled(tmp_path / "cls", ("a", "b", "c"))
    for f in (classes / "c").iterdir():
        f.write_bytes(b"\x93NUMPY broken")
    line = refused(capsys, shard_cli, classes, tmp_path / "cls-out", "--labels")
    assert "class c has no readable sample in train" in line and not (tmp_path / "cls-out").exists()
    labelled(mixed, ("cdm", "no_sub"))  # a labelled set written into the pairs' folder
    line = refused(capsys, shard_cli, mixed, tmp_path / "mixed-out")
    assert f"{mixed}: holds hr/ and lr/ (pairs) and also cdm, no_sub" in line  # not left out
    assert not (tmp_path / "mixed-out").exists()
    counts = images(tmp_path / "counts", 4, scale=4000, offset=82)
    line = refused(capsys, shard_cli, counts, tmp_path / "c-out", "--normalise", "unit")
    assert "--normalise unit says values lie in [0, 1], but they span 82 to 4082" in line
    assert not (tmp_path / "c-out").exists()

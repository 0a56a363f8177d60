"""Locating a run from its directory, a checkpoint or a weights file, where each evaluation is
written, and how a terminal shows one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from toolkit import evaluate
from toolkit.core.errors import UserError
from toolkit.runs import recipe
from toolkit.runs.directory import another_run, check_relaunch, eval_path, locate
from toolkit.runs.hold import Held, held

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory's layout: its recipe, a checkpoint with its own, an export."""
    r = recipe.load(ROOT / "recipes/debug.yaml", ["train.max_steps=5"])
    step = tmp_path / "run/checkpoints/step-00000005"
    step.mkdir(parents=True)
    (tmp_path / "run/recipe.yaml").write_text(recipe.dump(r))
    (step / "recipe.yaml").write_text(recipe.dump(recipe.load(ROOT / "recipes/debug.yaml")))
    (step / "train_state.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    (tmp_path / "run/model.safetensors").write_bytes(b"")
    (tmp_path / "run/other.safetensors").write_bytes(b"")
    return tmp_path / "run"


def test_locate_finds_the_run_and_the_recipe_that_describes_the_weights(run: Path) -> None:
    whole = locate(run)
    assert (whole.run_dir, whole.label, whole.recipe.train.max_steps) == (run.resolve(), "", 5)
    ckpt = locate(run / "checkpoints/step-00000005")
    assert (ckpt.run_dir, ckpt.label) == (run.resolve(), "step-00000005")
    assert ckpt.recipe.train.max_steps == 20  # the checkpoint's own recipe
    inside = locate(run / "checkpoints/step-00000005/model.safetensors")
    assert (inside.run_dir, inside.label) == (run.resolve(), "step-00000005")
    assert locate(run / "model.safetensors").label == ""
    assert locate(run / "other.safetensors").label == "other"
    assert locate(run, ["train.seed=3"]).recipe.train.seed == 3


def test_locate_refuses_what_names_no_model(run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such run directory"):
        locate(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match=r"no recipe\.yaml at"):
        locate(tmp_path / "bare")


def test_only_the_runs_own_final_validation_is_eval_json(run: Path) -> None:
    whole, ckpt = locate(run), locate(run / "checkpoints/step-00000005")
    assert eval_path(whole, "val", custom=False).name == "eval.json"
    assert eval_path(whole, "train", custom=False).name == "eval-train.json"
    assert eval_path(whole, "val", custom=True).name == "eval-custom.json"
    assert eval_path(ckpt, "train", custom=True).name == "eval-step-00000005-train-custom.json"


def test_text_shows_the_tasks_metrics_for_model_and_reference() -> None:
    stats = {"mean": 30.0, "median": 30.5, "worst": [["a", 20.0]]}
    doc = {"split": "val", "count": 2, "model": {"psnr": 31.234, "ssim": 0.91}, "reference":
           "bicubic", "bicubic": {"psnr": 29.0, "ssim": 0.9}, "per_image": {"model": {"psnr":
           stats}}}  # fmt: skip
    lines = evaluate.text(doc, Path("runs/x")).splitlines()
    assert lines[0] == "runs/x: val split, 2 images"
    assert lines[1].split() == ["PSNR", "(dB)", "SSIM"]
    assert lines[2].split() == ["model", "31.23", "0.9100"]
    assert lines[3].split() == ["bicubic", "29.00", "0.9000"]
    assert lines[4] == "per image psnr: mean 30.00, median 30.50; worst: a 20.00"


def test_a_run_another_process_holds_is_refused_before_its_checkpoints_are_read(run: Path) -> None:
    """Its writer prunes and writes checkpoints while a second launch would judge them (a
    checkpoint listed one instant is gone the next): the second launch is refused on the hold."""
    r = recipe.load(ROOT / "recipes/debug.yaml", [f"run.dir={run}"])
    with held(run, "training a"):
        in_use = rf"^run\.dir: {re.escape(str(run))}: in use by training a \(pid {os.getpid()} on "
        with pytest.raises(Held, match=in_use):
            check_relaunch(r, 1)


def test_a_run_cannot_go_on_under_a_model_with_other_buffers_or_optimiser_groups() -> None:
    """A probe's batch norm has no parameters, only statistics (buffers): its checkpoint does not
    load into a model without it; per-layer optimiser groups do not take an optimiser state of
    whole groups. Another decay keeps the groups: the run goes on."""
    probe = ROOT / "recipes/classify/linear_probe.yaml"
    then = recipe.load(probe)
    assert then.model.head_norm
    plain = recipe.load(probe, ["model.head_norm=false"])
    width = (then.model.embed_dim,)
    assert another_run(then, plain) == (
        f"model tensor head_norm.running_mean {width} in the run, absent here"
    )
    vit = ROOT / "recipes/classify/finetune.yaml"
    decayed = recipe.load(vit, ["optim.layer_decay=0.75"])
    assert another_run(recipe.load(vit), decayed) == (
        "optim.layer_decay off in the run, per layer here"
    )
    assert another_run(decayed, recipe.load(vit, ["optim.layer_decay=0.5"])) is None

"""The launch command's argument rules and world sizes, without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cluster import launching
from toolkit.core.errors import UserError
from toolkit.runs import recipe

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "recipes/debug.yaml")


def test_recipes_and_overrides_are_told_apart_in_any_order() -> None:
    args = launching.parse_args(["optim.lr=1e-3", DEBUG, "train.epochs=2", "--local"])
    assert (args.recipes, args.overrides) == ([DEBUG], ["optim.lr=1e-3", "train.epochs=2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([DEBUG, "--procs", "2"], "--procs goes with --local"),
        ([DEBUG, "--local", "--nodes", "2"], "--nodes: for Slurm launches, not --local"),
        ([DEBUG, DEBUG, "--local"], "--local runs one recipe"),
        ([DEBUG, "--json"], "--json goes with --dry-run"),
        ([DEBUG, "--wait", "--dry-run"], "--wait goes with a real launch"),
        ([DEBUG, "--after", "x1"], "--after: expected a Slurm job id"),
        ([DEBUG, "--local", "--procs", "0"], "--procs: expected an integer >= 1"),
        (["notes.txt"], "expected key=value or a recipe file"),
        (["a=1"], "no recipe given"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        launching.parse_args(argv)


def test_world_sizes_local_and_slurm() -> None:
    r = recipe.load(DEBUG)
    local = launching.world_of(r, launching.parse_args([DEBUG, "--local", "--procs", "3"]))
    assert (local.nodes, local.world_size, local.mode) == (1, 3, "local")
    gpus = launching.world_of(
        r, launching.parse_args([DEBUG, "--nodes", "2", "--gpus-per-node", "4"])
    )
    assert (gpus.nodes, gpus.gpus_per_node, gpus.world_size) == (2, 4, 8)
    cpus = launching.world_of(r, launching.parse_args([DEBUG, "--nodes", "3"]))
    assert cpus.world_size == 3  # the debug recipe's CPU nodes: one process each


def test_dry_run_shows_each_layers_learning_rate_under_layer_decay() -> None:
    """The debug MAE (depth 2, optim.lr 5e-4, no group rules) with optim.layer_decay=0.5: the
    document and the table give each layer its rate, 5e-4 x 0.5^(3 - layer): layer 0 the patch
    embedding, 1 and 2 the blocks, 3 the rest."""
    r = recipe.load(DEBUG, ["optim.layer_decay=0.5"])
    world = launching.world_of(r, launching.parse_args([DEBUG, "--local"]))
    groups = launching.dry_run_doc(r, world, [], None)["params"]["groups"]
    assert sorted({g["layer"] for g in groups}) == [0, 1, 2, 3]
    for g in groups:
        assert g["lr"] == pytest.approx(5e-4 * 0.5 ** (3 - g["layer"]), rel=1e-12)
    text = launching.dry_run_text("debug.yaml", r, world, [], as_json=False)
    header = next(line for line in text.splitlines() if line.startswith("rule"))
    assert header.split() == ["rule", "layer", "lr", "weight", "decay", "params"]
    rows = [line.split() for line in text.splitlines() if line.startswith("default ")]
    assert {(row[1], row[2]) for row in rows} == {
        ("0", "6.25e-05"),
        ("1", "1.25e-04"),
        ("2", "2.50e-04"),
        ("3", "5.00e-04"),
    }
    # Off: no layer column, as before.
    plain = launching.dry_run_text("debug.yaml", recipe.load(DEBUG), world, [], as_json=False)
    assert "layer" not in next(line for line in plain.splitlines() if line.startswith("rule"))


def test_dry_run_document_of_a_baseline() -> None:
    r = recipe.load(ROOT / "recipes/baselines/edsr.yaml")
    world = launching.world_of(r, launching.parse_args([DEBUG, "--local"]))
    doc = launching.dry_run_doc(r, world, ["a warning"], None)
    assert doc["params"]["total"] == doc["params"]["trainable"] == 6_643_713
    assert [g["rule"] for g in doc["params"]["groups"]] == ["default", "default"]  # decay / none
    assert doc["recipe"]["model"]["arch"] == "edsr" and doc["warnings"] == ["a warning"]
    text = launching.dry_run_text("edsr.yaml", r, world, [], as_json=False)
    assert "task: sr   model: edsr" in text and "params: 6,643,713 total" in text

"""Sweep specs: the product of the swept values in order, run directory names, list values, the
sweep file, and each bad spec as one user error."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.errors import UserError
from toolkit.sweep import parse, read, variants, write


def test_the_product_last_key_fastest_each_named_by_its_overrides() -> None:
    axes = parse(["optim.lr=1e-4,3e-4", "train.seed=0,1,2"])
    assert axes == {"optim.lr": ["1e-4", "3e-4"], "train.seed": ["0", "1", "2"]}
    vs = variants(axes)
    assert [v.overrides for v in vs[:4]] == [
        ("optim.lr=1e-4", "train.seed=0"),
        ("optim.lr=1e-4", "train.seed=1"),
        ("optim.lr=1e-4", "train.seed=2"),
        ("optim.lr=3e-4", "train.seed=0"),
    ]
    assert len(vs) == 6 and [v.index for v in vs] == list(range(6))
    assert vs[4].name == "optim.lr=3e-4,train.seed=1"
    assert len({v.name for v in vs}) == 6


def test_list_values_keep_their_commas_and_slashes_do_not_nest() -> None:
    axes = parse(["freeze=[encoder,decoder],[encoder],[]", "init.from=runs/a,runs/b"])
    assert axes["freeze"] == ["[encoder,decoder]", "[encoder]", "[]"]
    assert variants(axes)[0].name == "freeze=[encoder,decoder],init.from=runs_a"


def test_a_sweep_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  optim.lr: [1.0e-4, 0.001]\n  freeze: [[encoder], []]\n")
    assert parse([str(path)]) == {"optim.lr": ["0.0001", "0.001"], "freeze": ["[encoder]", "[]"]}
    path.write_text("optim.lr: [1, 2]\n")
    with pytest.raises(UserError, match=r"sweep.yaml: expected a mapping `sweep:"):
        parse([str(path)])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["optim.lr"], r"--sweep optim.lr: expected key=v1,v2,\.\.\. or a \.yaml sweep file"),
        (["optim.lr=1,2", "optim.lr=3"], r"optim.lr is swept twice"),
        (["run.dir=a,b"], r"run.dir cannot be swept"),
        (["cluster.nodes=1,2"], r"cluster.nodes cannot be swept"),
        (["optim.lr=1,,2"], r"--sweep optim.lr: expected distinct, non-empty values"),
        (["train.seed=1,1"], r"--sweep train.seed: expected distinct, non-empty values"),
        ([f"k{i}=0,1,2,3" for i in range(5)] + ["x=1,2"], r"2048 variants; at most 1000"),
    ],
)
def test_bad_sweeps_are_one_line(specs: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse(specs)


def test_the_record_reads_back(tmp_path: Path) -> None:
    axes = parse(["optim.lr=1,2"])
    write(tmp_path, "r.yaml", axes, variants(axes), "123")
    doc = read(tmp_path)
    assert doc is not None and doc["array"] == "123" and doc["axes"] == axes
    assert [v["name"] for v in doc["variants"]] == ["optim.lr=1", "optim.lr=2"]
    assert read(tmp_path / "nothing") is None
    (tmp_path / "sweep.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a sweep record"):
        read(tmp_path)

"""Sweep specs: the product of the swept values in order, run directory names, list values, the
sweep file, and each bad spec as one user error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import DEBUG_RECIPE
from toolkit import launch, report
from toolkit.core.errors import UserError
from toolkit.runs import recipe
from toolkit.runs.sweep import parse, read, variants, write


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
    for text, got in [("sweep: {}\n", "an empty mapping"), ("sweep: [1]\n", "a list")]:
        path.write_text(text)
        with pytest.raises(
            UserError, match=rf"sweep.yaml: sweep: expected a mapping .*, got {got}"
        ):
            parse([str(path)])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["optim.lr"], r"--sweep optim.lr: expected key=v1,v2,\.\.\. or a \.yaml sweep file"),
        (
            ["optim.lr=1,2", "optim.lr=3"],
            r"--sweep optim.lr: swept twice \(also by --sweep optim.lr\)",
        ),
        (["run.dir=a,b"], r"--sweep run.dir: cannot be swept"),
        (["cluster.nodes=1,2"], r"--sweep cluster.nodes: cannot be swept"),
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


# Each bad sweep: (id, the sweep file's bytes or None, the launch's arguments after the recipe,
# the start of its one error line). "{file}" stands for the sweep file's path.
REFUSED = [
    # A sweep file is read as strictly as a recipe.
    ("file-key-twice", b"sweep:\n  optim.lr: [1, 2]\n  optim.lr: [3]\n", ["--sweep", "{file}"],
     "{file} (line 3): invalid YAML: duplicate key 'optim.lr' (also on line 2; YAML keys are"),
    ("file-unknown-key", b"sweep:\n  optim.lr: [1, 2]\nsweeps: 1\n", ["--sweep", "{file}"],
     "{file}: sweeps: unknown key; did you mean 'sweep'?"),
    ("file-unknown-key-far", b"sweep:\n  optim.lr: [1, 2]\nfoo: 1\n", ["--sweep", "{file}"],
     "{file}: foo: unknown key; expected one of: sweep"),
    ("file-not-utf8", b"\xff\xfe", ["--sweep", "{file}"],
     "{file}: cannot read sweep: expected UTF-8 text, got byte 0xff at offset 0"),
    ("file-bad-yaml", b"sweep:\n  optim.lr: [1, 2\n", ["--sweep", "{file}"],
     "{file} (line 3): invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("file-missing", None, ["--sweep", "{file}"], "{file}: sweep file not found"),
    # A key both overridden and swept: every variant would drop the override.
    ("override-and-sweep", None, ["optim.lr=0.5", "--sweep", "optim.lr=1e-3,2e-3"],
     "--sweep optim.lr: also set by the override optim.lr=0.5, whose value every variant"),
    ("override-section", None, ["optim={lr: 0.5}", "--sweep", "optim.lr=1e-3,2e-3"],
     "--sweep optim.lr: also set by the override optim={lr: 0.5}"),
    ("override-and-file", b"sweep: {optim.lr: [1.0e-3, 2.0e-3]}\n",
     ["--sweep", "{file}", "optim.lr=0.5"],
     "{file}: sweep.optim.lr: also set by the override optim.lr=0.5"),
    ("swept-twice-section", None, ["--sweep", "optim.lr=1,2", "--sweep", "optim={lr: 3}"],
     "--sweep optim: swept twice (also by --sweep optim.lr)"),
    ("run-section", None, ["--sweep", "run={dir: a},{dir: b}"], "--sweep run: cannot be swept"),
    # Values equal once normalised, and run directory names that collide or cannot be.
    ("values-equal-stripped", None, ["--sweep", "label=x,x "],
     "--sweep label: expected distinct, non-empty values, got ['x', 'x']"),
    ("values-equal-as-text", b"sweep:\n  train.seed: [1, '1']\n", ["--sweep", "{file}"],
     "{file}: sweep.train.seed: expected distinct, non-empty values, got ['1', '1']"),
    ("names-collide", None, ["--sweep", "label=a/b,a_b"],
     "--sweep label: 'label=a/b' and 'label=a_b' give one run directory name, 'label=a_b'"),
    ("same-recipe", None, ["--sweep", "train.seed=0,1", "--sweep", "optim.lr=1e-3,0.001"],
     "--sweep optim.lr: 'optim.lr=1e-3' and 'optim.lr=0.001' give the same recipe (variants 0 "
     "and 1"),
    ("name-too-long", None, ["--sweep", "train.seed=0,1", "--sweep", "label=" + "y" * 300 + ",z"],
     "--sweep label: the run directory name of variant 0 ('train.seed=0,label="
     + "y" * 21 + "'...) is 319 bytes: expected values short enough for a file name (255)"),
    ("nul-in-value", b'sweep: {label: ["a\\0b", c]}\n', ["--sweep", "{file}"],
     "{file}: sweep.label: expected values without a NUL character"),
]  # fmt: skip


@pytest.mark.parametrize(("file", "args", "expected"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])  # fmt: skip
def test_a_bad_sweep_is_one_line_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    file: bytes | None,
    args: list[str],
    expected: str,
) -> None:
    """`launch --sweep ... --local`, no dry run: the bad sweep is refused while planning, as
    one line naming the flag or file and the key, exit status 2, before sweep.json or any run
    directory is written (and before a variant could train twice or share a directory)."""
    monkeypatch.chdir(tmp_path)  # the debug recipe's shards are not here: nothing could train
    sweep_file = tmp_path / "s.yaml"
    if file is not None:
        sweep_file.write_bytes(file)
    args = [a.replace("{file}", str(sweep_file)) for a in args]
    base = tmp_path / "sweep"
    code = launch.main([str(DEBUG_RECIPE), f"run.dir={base}", *args, "--local"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert err.removeprefix("error: ").startswith(expected.replace("{file}", str(sweep_file)))
    assert not base.exists()  # no sweep.json, no run directory
    assert {p.name for p in tmp_path.iterdir()} <= {"s.yaml"}


@pytest.mark.parametrize(
    ("variants", "got"),
    [
        ([1, 2], "1"),  # the audit's record: a TypeError in the report
        ([{"name": 1, "overrides": []}], '{"name": 1, "overrides": []}'),
        ([{"name": "../elsewhere", "overrides": []}], '{"name": "../elsewhere"'),
        ([{"name": "a"}], '{"name": "a"}'),
        ([{"name": "a", "overrides": "optim.lr=1"}], '{"name": "a", "overrides": "optim.lr=1"}'),
        ([{"name": "a", "overrides": [1]}], '{"name": "a", "overrides": [1]}'),
    ],
)
def test_a_bad_sweep_record_is_one_line_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], variants: list, got: str
) -> None:
    """`report SWEEP_DIR` on a sweep.json whose variants are not {name, overrides} (edited by
    hand, another tool's): one line naming the file and the entry, exit 2, no report."""
    base = tmp_path / "sweep"
    base.mkdir()
    (base / "sweep.json").write_text(json.dumps({"axes": {}, "variants": variants}))
    code = report.main([str(base), "--out", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(
        f"error: {base / 'sweep.json'}: variants[0]: expected a mapping with a `name` "
    )
    assert f"got {got}" in err
    assert not (tmp_path / "report").exists()


def test_a_variant_writes_its_swept_values_and_metrics_to_the_hparams_dashboard(tmp_path) -> None:
    """A run directory that sweep.json lists is a variant: its swept keys (seed included) and
    final metrics go into its own tb/ event file, read back here by TensorBoard's reader."""
    from tests.helpers import hparams_of
    from toolkit.core.logging import RunLogger
    from toolkit.runs.sweep import swept_of, value_at

    axes = {"data.limit": ["8", "32"], "init.from": ["runs/a", "runs/b"], "train.seed": ["0"]}
    base = tmp_path / "sweep"
    write(base, str(DEBUG_RECIPE), axes, variants(axes))
    run_dir = base / "data.limit=32,init.from=runs_b,train.seed=0"
    swept = swept_of(run_dir)
    assert swept == {"data.limit": "32", "init.from": "runs/b", "train.seed": "0"}
    assert swept_of(tmp_path / "alone") is None and swept_of(base / "not-a-variant") is None
    r = recipe.load(DEBUG_RECIPE, [f"{k}={v}" for k, v in swept.items()])
    values = {k: value_at(recipe.to_dict(r), k) for k in swept}
    log = RunLogger(run_dir, enabled=True, total_steps=4)
    log.log({"train/loss": 0.5}, 4)
    log.hparams(values, {"loss": 0.25, "accuracy": float("nan"), "note": "x"}, 4)
    log.close()
    got, metric_tags, scalars = hparams_of(run_dir / "tb")
    # numbers as numbers (the dashboard sorts and plots them), the path as text
    assert got == {"data.limit": 32.0, "init.from": "runs/b", "train.seed": 0.0}
    assert metric_tags == ["eval/loss"]  # non-finite and non-numeric values are left out
    assert scalars["eval/loss"] == [0.25] and scalars["train/loss"] == [0.5]


CLASSIFY = Path(DEBUG_RECIPE).parent / "classify"


def test_a_swept_recipe_names_its_variants_by_the_file_stem() -> None:
    axes = parse([f"recipe={CLASSIFY}/cnn.yaml,{CLASSIFY}/scratch.yaml", "data.per_class=10,30"])
    vs = variants(axes)
    assert [v.name for v in vs] == [
        "recipe=cnn,data.per_class=10", "recipe=cnn,data.per_class=30",
        "recipe=scratch,data.per_class=10", "recipe=scratch,data.per_class=30",
    ]  # fmt: skip
    assert vs[2].recipe == f"{CLASSIFY}/scratch.yaml"
    assert vs[2].settings == ["data.per_class=10"]
    assert variants(parse(["train.seed=0,1"]))[0].recipe is None


def test_a_swept_recipe_is_each_variant_s_base(tmp_path, capsys, monkeypatch) -> None:
    """Each variant resolves its own file (the CNN's arch, the probe's freeze and head_norm),
    with the launch's overrides and its own run directory under the shared run.dir."""
    monkeypatch.chdir(tmp_path)
    files = ",".join(f"{CLASSIFY}/{m}.yaml" for m in ("cnn", "linear_probe"))
    code = launch.main(["--sweep", f"recipe={files}", "--sweep", "train.seed=0,1",
                        "run.dir=runs/s", "--local", "--dry-run", "--json"])  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["sweep"]["dir"] == "runs/s"
    got = [(v["recipe"]["model"]["arch"], v["recipe"]["freeze"], v["recipe"]["model"].get(
        "head_norm"), v["recipe"]["train"]["seed"], v["recipe"]["run"]["dir"])
        for v in doc["variants"]]  # fmt: skip
    assert got == [
        ("cnn", [], None, 0, "runs/s/recipe=cnn,train.seed=0"),
        ("cnn", [], None, 1, "runs/s/recipe=cnn,train.seed=1"),
        ("vit_classifier", ["encoder"], True, 0, "runs/s/recipe=linear_probe,train.seed=0"),
        ("vit_classifier", ["encoder"], True, 1, "runs/s/recipe=linear_probe,train.seed=1"),
    ]


RECIPE_REFUSED = [
    ("given-and-swept", [str(DEBUG_RECIPE), "--sweep", "recipe={cnn},{scratch}"],
     "--sweep recipe: the recipe is swept, so no recipe file goes on the command line"),
    ("neither", ["--sweep", "train.seed=0,1"],
     "no recipe given: expected a recipe file (.yaml/.yml) or a sweep of `recipe`"),
    ("not-a-recipe-file", ["--sweep", "recipe={cnn},notes.txt"],
     "--sweep recipe: expected recipe files (.yaml/.yml), got"),
    ("missing-file", ["--sweep", "recipe={cnn},{tmp}/missing.yaml", "run.dir=r"],
     "{tmp}/missing.yaml"),
    ("task", ["--sweep", "recipe={cnn},{pretrain}", "run.dir=r"],
     "{pretrain}: task: 'mae', but {cnn} has 'classify': expected the swept recipes to share task"),
    ("run-dir", ["--sweep", "recipe={cnn},{scratch}"],
     "{scratch}: run.dir: 'runs/classify_scratch', but {cnn} has 'runs/classify_cnn': expected "
     "the swept recipes to share run.dir (one sweep directory)"),
    ("cluster", ["--sweep", "recipe={cnn},{tmp}/big.yaml", "run.dir=r"],
     "{tmp}/big.yaml: cluster.nodes: 2, but {cnn} has 1: expected the swept recipes to share "
     "cluster.nodes (one job array)"),
    ("same-stem", ["--sweep", "recipe={cnn},{tmp}/cnn.yaml", "run.dir=r"],
     "--sweep recipe: 'recipe={cnn}' and 'recipe={tmp}/cnn.yaml' give one run directory name"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in RECIPE_REFUSED],
                         ids=[c[0] for c in RECIPE_REFUSED])  # fmt: skip
def test_a_bad_swept_recipe_is_one_line(tmp_path, capsys, monkeypatch, args, expected) -> None:
    """Every listed file loads, and they share task, run.dir and cluster (one table, one sweep
    directory, one job array), else one line naming the file and key, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.yaml").write_text(f"extends: {CLASSIFY}/cnn.yaml\ncluster: {{nodes: 2}}\n")
    (tmp_path / "cnn.yaml").write_text(f"extends: {CLASSIFY}/cnn.yaml\n")
    paths = {
        "cnn": f"{CLASSIFY}/cnn.yaml",
        "scratch": f"{CLASSIFY}/scratch.yaml",
        "pretrain": f"{Path(DEBUG_RECIPE).parent}/pretrain.yaml",
        "tmp": str(tmp_path),
    }
    code = launch.main([a.format(**paths) for a in args] + ["--local"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert err.removeprefix("error: ").startswith(expected.format(**paths)), err
    assert {p.name for p in tmp_path.iterdir()} == {"big.yaml", "cnn.yaml"}


STUDIES = sorted((Path(DEBUG_RECIPE).parent / "studies").rglob("*sweep.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_a_study_sweep_file_names_recipes_beside_it_from_any_directory(
    path: Path, tmp_path: Path, monkeypatch
) -> None:
    """A sweep file's recipe paths are read from its folder, as `extends` is: the study works
    from any directory (and from the installed package's recipes)."""
    monkeypatch.chdir(tmp_path)
    axes = parse([str(path)])
    for file in axes.get("recipe", []):
        assert Path(file).parent == path.parent
        recipe.load(file)  # each mode's recipe loads
    assert len(variants(axes)) == {"sweep.yaml": 60 if "classify" in str(path) else 45,
                                   "pretrain_sweep.yaml": 2}[path.name]  # fmt: skip

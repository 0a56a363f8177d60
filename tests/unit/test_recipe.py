"""The recipe schema: every shipped recipe, overrides, extends chains and each error kind."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from toolkit.core import config
from toolkit.runs import recipe
from toolkit.runs.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[2]
# Complete recipes; the _partial ones are checked through the recipes that extend them, the
# sweep files (a top-level `sweep:`) by tests/unit/test_sweep.py.
SHIPPED = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml")
    if not p.name.startswith("_") and not p.read_text().count("\nsweep:")
)  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    r = recipe.load(path)
    again = recipe.load(write(tmp_path / "dumped.yaml", recipe.dump(r)))
    assert again == r


def test_workload_settings() -> None:
    pre = recipe.load(ROOT / "recipes/pretrain.yaml")
    assert (pre.task, pre.model.arch, pre.model.embed_dim) == ("mae", "mae", 256)
    assert pre.optim.name == "adamw" and pre.optim.weight_decay == 1e-4
    assert pre.optim.lr == 5e-4
    assert [(g.match, g.lr) for g in pre.optim.groups] == [(r"^encoder\.", 8e-5)]
    s = pre.optim.scheduler
    assert (s.name, s.T_0, s.T_mult, s.eta_min) == ("cosine_warm_restarts", 10, 1, 8e-5)
    modes = {
        "finetune_frozen_mae": (["mae"], 150, "runs/pretrain"),
        "finetune_frozen_encoder": (["encoder"], 150, "runs/pretrain"),
        "finetune": ([], 50, "runs/finetune_frozen_encoder"),
    }
    for name, (freeze, epochs, init) in modes.items():
        r = recipe.load(ROOT / f"recipes/{name}.yaml")
        assert (r.freeze, r.train.epochs, r.init.from_) == (freeze, epochs, init)
        assert r.train.loss == "l1" and (r.task, r.model.arch) == ("sr", "srmae")
        assert r.run_dir == Path("runs") / name
    full = recipe.load(ROOT / "recipes/finetune.yaml")
    assert full.optim.groups[0].lr == 8e-5


def test_overrides_coerce_to_the_field_type() -> None:
    r = recipe.load(
        ROOT / "recipes/finetune.yaml",
        [
            "optim.lr=3e-4",  # YAML alone would read this as a string
            "train.epochs=2",
            "freeze=[encoder]",
            "deepspeed=null",
            "cluster.time=24:00:00",  # YAML alone would read this as 86400
            "train.grad_clip=2",
            "name=7",
            "optim.groups=[{match: '^decoder', weight_decay: 0}]",
        ],
    )
    assert r.optim.lr == 3e-4 and isinstance(r.optim.lr, float)
    assert r.train.epochs == 2 and r.freeze == ["encoder"] and r.deepspeed is None
    assert r.cluster.time == "24:00:00" and r.name == "7"
    assert r.train.grad_clip == 2.0 and isinstance(r.train.grad_clip, float)
    assert r.optim.groups == [recipe.GroupRule(match="^decoder", weight_decay=0.0)]


def test_override_into_a_null_section(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "task: mae\ndeepspeed: null\n")
    assert recipe.load(path).deepspeed is None
    assert recipe.load(path, ["deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3


def test_extends_chain_child_wins(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "a.yaml",
        "name: a\ntask: mae\ntrain: {epochs: 5, seed: 3}\noptim: {lr: 1.0e-3}\n",
    )
    write(tmp_path / "sub/b.yaml", "extends: ../a.yaml\ntrain: {epochs: 7}\n")
    c = write(tmp_path / "sub/c.yaml", "extends: b.yaml\nname: c\noptim: {weight_decay: 0.5}\n")
    r = recipe.load(c)
    assert (r.name, r.train.epochs, r.train.seed) == ("c", 7, 3)
    assert (r.optim.lr, r.optim.weight_decay) == (1e-3, 0.5)


def test_extends_cycle_is_rejected(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        recipe.load(tmp_path / "a.yaml")


def test_extends_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"extends: .*nope\.yaml not found"):
        recipe.load(write(tmp_path / "a.yaml", "extends: nope.yaml\n"))


def test_unknown_key_names_path_file_and_suggestion(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "task: mae\noptim: {lrr: 1.0}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: x\n")
    with pytest.raises(RecipeError) as err:
        recipe.load(child)
    msg = str(err.value)
    # The key came from the parent file: the message names that file, not the child.
    assert "base.yaml" in msg and "optim.lrr" in msg and "did you mean 'optim.lr'" in msg
    assert "\n" not in msg


def test_unknown_key_in_override_suggests_across_sections() -> None:
    with pytest.raises(RecipeError) as err:
        recipe.load(ROOT / "recipes/pretrain.yaml", ["lr=1"])
    assert "override lr=1" in str(err.value) and "did you mean 'optim.lr'" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=-1", "optim.lr", "> 0"),
        ("model.mask_ratio=1.0", "model.mask_ratio", "< 1"),
        ("model.mask_ratio=-0.1", "model.mask_ratio", ">= 0"),
        ("data.batch_size=0", "data.batch_size", "> 0"),
        ("train.epochs=2.5", "train.epochs", "an integer"),
        ("train.precision=fp16", "train.precision", "bf16, no"),
        ("data.scale=5", "data.scale", "2, 3, 4"),
        ("optim.lr=fast", "optim.lr", "a number"),
        ("model.norm_pix_loss=1", "model.norm_pix_loss", "true or false"),
        ("freeze=encoder", "freeze", "a list"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "0, 1, 2, 3"),
        ("data.limit=0", "data.limit", "> 0"),
        ("data.per_class=-3", "data.per_class", "> 0"),
        ("data.per_class=2.5", "data.per_class", "an integer"),
        ("data.subset_seed=-1", "data.subset_seed", ">= 0"),
        ("model.drop_path=1.0", "model.drop_path", "< 1"),
        ("model.drop_path=-0.1", "model.drop_path", ">= 0"),
    ],
)
def test_wrong_type_or_range_names_key_value_and_expectation(
    override: str, key: str, expected: str
) -> None:
    with pytest.raises(RecipeError) as err:
        recipe.load(ROOT / "recipes/finetune.yaml", [override])
    msg = str(err.value)
    assert f"{key}:" in msg and expected in msg and override.split("=", 1)[1] in msg


# Each recipe text; a text naming no task (and no stage) is read as a `task: mae` recipe.
CHECKS = [
    ("task: sr\nfreeze: [mae]\n", "init.from", "needs trained weights"),
    ("model: {img_size: 155, patch_size: 10}\n", "model.img_size", "not divisible"),
    ("model: {embed_dim: 100, num_heads: 8}\n", "model.num_heads", "does not divide"),
    ("task: sr\nmodel: {img_size: 150}\ndata: {scale: 4}\n", "data.scale", "divide"),
    ("task: sr\nfreeze: ['(dec']\ninit: {from: x}\n", "freeze[0]", "nor a valid regex"),
    ("optim: {groups: [{match: '(enc'}]}\n", "optim.groups[0].match", "not a valid regex"),
    ("optim: {groups: [{lr: 1.0}]}\n", "optim.groups[0].match", "missing required key"),
    ("deepspeed: {zero_stage: 2, offload_param: cpu}\n", "deepspeed.offload_param", "3"),
    ("train: {epochs: 0}\n", "train.epochs", "nothing to train"),
    ("deepspeed: {zero_stage: 0}\ntrain: {precision: bf16}\n", "deepspeed.zero_stage", "bf16 copy"),
    ("cluster: {gres: 'gpu:many'}\n", "cluster.gres", "gpu:N or gpu:TYPE:N"),
    ("cluster: {mem: lots}\n", "cluster.mem", "64G"),
    ("train: {loss: l1}\n", "train.loss", "MSE on masked patches"),
    ("cluster: {time: 24:00:00}\n", "cluster.time", "quote it"),
    ("cluster: {time: 'tomorrow'}\n", "cluster.time", "HH:MM:SS"),
    ("name: a/b\n", "name", "directory name"),
    ("optim: {betas: [0.9]}\n", "optim.betas", "two numbers"),
    ("data: [1, 2]\n", "data", "a mapping"),
    ("data: {limit: 100, per_class: 10}\n", "data.per_class", "data.limit or data.per_class"),
    # tasks and architectures
    ("task: ''\n", "task", "missing: name what to train, one of: classify, mae, sr"),
    ("task: ssr\n", "task", "'ssr' is not one of: classify, mae, sr; did you mean 'sr'?"),
    ("task: sr\nmodel: {arch: edsrr}\n", "model.arch", "did you mean 'edsr'?"),
    ("model: {arch: edsr}\n", "model.arch", "does not do task 'mae' (it does: sr)"),
    ("task: sr\nmodel: {arch: edsr, n_feat: 8}\n", "model.n_feat", "'model.n_feats'"),
    ("task: sr\nmodel: {arch: edsr, patch_size: 8}\n", "model.patch_size", "unknown key"),
    ("task: sr\nmodel: {arch: srmae, n_feats: 8}\n", "model.n_feats", "unknown key"),
    ("task: sr\nmodel: {arch: rcan, reduction: 10}\n", "model.reduction", "does not divide"),
    ("task: sr\nmodel: {arch: edsr, n_resblocks: 0}\n", "model.n_resblocks", "> 0"),
    (
        "task: sr\nmodel: {arch: edsr}\noptim: {layer_decay: 0.75}\n",
        "optim.layer_decay",
        "model.arch edsr has no transformer layers to number (a ViT's: mae, srmae, vit_classifier)",
    ),
    (
        "task: classify\nmodel: {arch: cnn}\noptim: {layer_decay: 0.5}\n",
        "optim.layer_decay",
        "model.arch cnn has no transformer layers",
    ),
    (
        "task: sr\nmodel: {arch: rcan}\noptim: {layer_decay: 0.5}\n",
        "optim.layer_decay",
        "model.arch rcan has no transformer layers",
    ),
    ("optim: {layer_decay: 0}\n", "optim.layer_decay", "expected > 0 and <= 1"),
    ("optim: {layer_decay: 1.5}\n", "optim.layer_decay", "expected > 0 and <= 1"),
    # the recipes of before tasks: mapped, or refused with what to write instead
    ("stage: finetune\ntask: sr\n", "stage", "replaced by `task`; remove `stage`"),
    ("stage: classify\n", "stage", "write `task: mae` for `stage: pretrain`, `task: sr` for"),
]


@pytest.mark.parametrize(("text", "key", "expected"), CHECKS)
def test_checks_name_file_and_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    if not re.search(r"^(task|stage):", text, flags=re.MULTILINE):
        text = "task: mae\n" + text
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as err:
        recipe.load(path)
    msg = str(err.value)
    assert str(path) in msg and f"{key}:" in msg and expected in msg


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="expected a mapping"):
        recipe.load(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(RecipeError, match=r"broken.yaml \(line 2\): invalid YAML"):
        recipe.load(write(tmp_path / "broken.yaml", "name: a\ndata: {shards: ]\n"))
    with pytest.raises(RecipeError, match="not found"):
        recipe.load(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    text = "name: r\ntask: sr\nmodel:\n  depth: 2\n  embed_dim: 64\n  depth: 3\n"
    with pytest.raises(RecipeError) as err:
        recipe.load(write(tmp_path / "twice.yaml", text))
    assert re.fullmatch(
        r".*twice\.yaml \(line 6\): invalid YAML: duplicate key 'depth' \(also on line 4.*",
        str(err.value),
    )
    with pytest.raises(RecipeError, match="duplicate key 'name'"):
        recipe.load(write(tmp_path / "top.yaml", "name: a\ntask: sr\nname: b\n"))
    with pytest.raises(RecipeError, match="duplicate key 'match'"):
        recipe.load(write(tmp_path / "r.yaml", "name: r\ntask: sr\n"),
                    ["optim.groups=[{match: a, match: b}]"])  # fmt: skip
    # YAML's merge key is not a duplicate: a section merged from an anchor, then one key changed
    ok = "name: r\ntask: sr\noptim:\n  <<: {lr: 1.0e-3, weight_decay: 0.1}\n  lr: 2.0e-3\n"
    r = recipe.load(write(tmp_path / "merge.yaml", ok))
    assert (r.optim.lr, r.optim.weight_decay) == (2e-3, 0.1)


@pytest.mark.parametrize("text", ["", "# a recipe to be written\n", "---\n"])
def test_an_empty_recipe_is_refused(tmp_path: Path, text: str) -> None:
    empty = write(tmp_path / "empty.yaml", text)
    with pytest.raises(RecipeError, match=r"empty\.yaml: the recipe is empty"):
        recipe.load(empty)
    child = write(tmp_path / "child.yaml", "extends: empty.yaml\nname: c\ntask: sr\n")
    with pytest.raises(RecipeError, match=r"empty\.yaml: the recipe is empty"):
        recipe.load(child)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.depth=" + "1" * 400, "expected an int64"),
        ("train.seed=-" + "1" * 30, "expected an int64"),
        ("model.depth=1025", "expected > 0 and <= 1024"),
        ("model.embed_dim=131072", "expected > 0 and <= 65536"),
        ("model.img_size=100000", "expected > 0 and <= 65536"),
    ],
)
def test_absurd_sizes_are_refused_when_read(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        recipe.load(ROOT / "recipes/finetune.yaml", [override])
    key = override.split("=")[0]
    assert f": {key}: " in str(err.value) and expected in str(err.value)
    assert len(str(err.value)) < 300  # one readable line, not the 400 digits twice


def test_a_normalisation_the_loader_does_not_know_is_refused_when_read() -> None:
    r = recipe.load(ROOT / "recipes/finetune.yaml", ["data.normalise=asinh:0.1"])
    assert r.data.normalise == "asinh:0.1"
    with pytest.raises(RecipeError) as err:
        recipe.load(ROOT / "recipes/finetune.yaml", ["data.normalise=percentile:99,1"])
    assert ": data.normalise: 'percentile:99,1': expected 0 <= lo < hi <= 100" in str(err.value)


def test_bad_override_syntax(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "name: r\ntask: mae\n")
    with pytest.raises(RecipeError, match="key=value"):
        recipe.load(path, ["optim..lr=1"])
    with pytest.raises(RecipeError, match=r"train\.epochs is an integer, not a section"):
        recipe.load(path, ["train.epochs=3", "train.epochs.x=1"])


def test_defaults_are_not_shared_between_recipes() -> None:
    a, b = recipe.Recipe(), recipe.Recipe()
    a.optim.groups.append(recipe.GroupRule(match="x"))
    a.optim.scheduler.T_0 = 99
    assert b.optim.groups == [] and b.optim.scheduler.T_0 == 10


def test_from_dict_round_trip() -> None:
    r = recipe.load(ROOT / "recipes/finetune_frozen_mae.yaml")
    assert recipe.from_dict(recipe.to_dict(r)) == r


def test_extends_a_list_merges_in_order(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: a\ntask: mae\ntrain: {epochs: 5, seed: 3}\n")
    write(tmp_path / "b.yaml", "train: {epochs: 7}\noptim: {lr: 1.0e-3}\n")
    c = write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\noptim: {weight_decay: 0.5}\n")
    r = recipe.load(c)
    assert (r.name, r.train.epochs, r.train.seed) == ("a", 7, 3)  # b wins over a
    assert (r.optim.lr, r.optim.weight_decay) == (1e-3, 0.5)
    with pytest.raises(RecipeError, match="extends: expected a path"):
        recipe.load(write(tmp_path / "d.yaml", "extends: [a.yaml, 3]\n"))


def test_stage_recipes_map_to_task_and_architecture(tmp_path: Path) -> None:
    """An old recipe's one model section held both models' fields: `stage: pretrain` reads as
    the MAE (which has no SR layers, so sr_channels is dropped), `stage: finetune` as SR-MAE."""
    model = "model: {embed_dim: 64, num_heads: 4, sr_channels: 16, mask_ratio: 0.5}\n"
    pre = recipe.load(write(tmp_path / "pre.yaml", "stage: pretrain\n" + model))
    assert (pre.task, pre.model.arch, pre.model.mask_ratio) == ("mae", "mae", 0.5)
    assert not hasattr(pre.model, "sr_channels")
    fine = recipe.load(write(tmp_path / "fine.yaml", "stage: finetune\n" + model))
    assert (fine.task, fine.model.arch, fine.model.sr_channels) == ("sr", "srmae", 16)
    # the mapping is what a new recipe would say: dumped, it loads as the same recipe
    assert recipe.load(write(tmp_path / "again.yaml", recipe.dump(fine))) == fine
    assert "stage" not in recipe.to_dict(fine)


def test_each_architecture_validates_its_own_fields(tmp_path: Path) -> None:
    r = recipe.load(write(tmp_path / "e.yaml", "task: sr\nmodel: {arch: edsr, n_feats: 8}\n"))
    assert (r.model.arch, r.model.n_feats, r.model.n_resblocks) == ("edsr", 8, 16)
    # the override switches the architecture's schema too
    r = recipe.load(ROOT / "recipes/baselines/rcan.yaml", ["model.n_resgroups=2"])
    assert (r.model.arch, r.model.n_resgroups, r.model.n_resblocks) == ("rcan", 2, 9)


# --- an unknown key, in every section of the schema ---------------------------------------------

UNKNOWN = "zzz_unknown"  # close to no key anywhere: the message lists the section's keys


def sections(cls: type = recipe.Recipe, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted section, its dataclass) for every nested section of the schema, walked from the
    dataclasses: optional sections (deepspeed), list items (optim.groups[0]); the model section,
    whose dataclass depends on model.arch, is listed per architecture by the caller."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = config.dataclass_of(hints[f.name])
        if inner is None or inner is recipe.ModelBase:
            continue
        dotted = prefix + config.yaml_key(f)
        if typing.get_origin(hints[f.name]) is list:
            dotted += "[0]"
        out += [(dotted, inner), *sections(inner, dotted + ".")]
    return out


def _model_cases() -> list[tuple[str, str, str, type]]:
    from toolkit.models import MODELS

    return [
        (f"model ({arch})", MODELS.get(arch).tasks[0], arch, MODELS.get(arch).config)
        for arch in MODELS.builtin_names()  # a test file's toy: tests/e2e/test_registered.py
    ]


# (case id, task, architecture, the section's dotted name and dataclass)
UNKNOWN_CASES = [
    *[(s, "mae", "mae", s, c) for s, c in [("", recipe.Recipe), *sections()]],
    *[(case, task, arch, "model", cls) for case, task, arch, cls in _model_cases()],
]


def test_the_walk_reaches_every_section_and_architecture() -> None:
    """The parametrisation below is only as good as this list: it must hold the nested sections
    and every registered architecture (a new one joins by itself)."""
    names = [case for case, *_ in UNKNOWN_CASES]
    for expected in ("", "data", "init", "optim", "optim.scheduler", "optim.groups[0]", "train",
                     "deepspeed", "cluster", "run"):  # fmt: skip
        assert expected in names
    for arch in ("mae", "srmae", "edsr", "rcan", "vit_classifier", "cnn"):
        assert f"model ({arch})" in names


def _nest(dotted: str, leaf: dict) -> dict:
    """{"optim": {"groups": [leaf]}} for "optim.groups[0]", and so on; the root: leaf itself."""
    if not dotted:
        return leaf
    head, _, rest = dotted.partition(".")
    inner = _nest(rest, leaf)
    if head.endswith("[0]"):
        return {head[:-3]: [inner]}
    return {head: inner}


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize(
    ("task", "arch", "section", "cls"),
    [case[1:] for case in UNKNOWN_CASES],
    ids=[case[0] or "(root)" for case in UNKNOWN_CASES],
)
def test_an_unknown_key_is_refused_in_every_section(
    tmp_path: Path, where: str, task: str, arch: str, section: str, cls: type
) -> None:
    """A key the section does not have, in a file or an override, is one RecipeError line that
    names the file (or override), the dotted key in its section and that section's keys: a
    section that let it through would silently ignore a misspelt setting."""
    leaf: dict = {UNKNOWN: 1}
    if section.endswith("[0]"):
        leaf["match"] = "x"  # a list item has its required key; only the unknown one is wrong
    key = f"{section}.{UNKNOWN}" if section else UNKNOWN
    base = {"task": task, "model": {"arch": arch}}
    if where == "file":
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(config.merge(base, _nest(section, leaf))))
        overrides, origin = [], str(path)
    else:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(base))
        if section.endswith("[0]"):  # a list item is given with its list
            item = f"{section[:-3]}=[{{match: x, {UNKNOWN}: 1}}]"
        else:
            item = f"{key}=1"
        overrides, origin = [item], f"{path} (override {item})"
    with pytest.raises(RecipeError) as err:
        recipe.load(path, overrides)
    msg = str(err.value)
    known = ", ".join(config.yaml_key(f) for f in dataclasses.fields(cls))
    assert msg == f"{origin}: {key}: unknown key; expected one of: {known}"


def launch_refuses(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """`launch ... --dry-run` on bad input: exit status 2, nothing on stdout, one `error:` line
    and no traceback on stderr (the project's contract for a user error); that line."""
    from toolkit import launch

    code = launch.main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"\xff\xfe", 0),  # the bytes of the audit
        ("task: mae\n".encode("utf-16"), 0),  # a UTF-16 save starts with its BOM, ff fe
        ("name: caf\u00e9\ntask: mae\n".encode("latin-1"), 9),  # Latin-1: \xe9 after "name: caf"
    ],
    ids=["ff-fe", "utf-16", "latin-1"],
)
def test_a_recipe_that_is_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, offset: int
) -> None:
    """A recipe in another encoding (or binary) is refused by name, not a UnicodeDecodeError
    traceback; through `extends:` it is the parent that is named."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(data)
    byte = data[offset]
    expected = f"{bad}: cannot read recipe: expected UTF-8 text, got byte 0x{byte:02x} at offset"
    assert launch_refuses(capsys, str(bad)) == f"{expected} {offset}"
    child = write(tmp_path / "child.yaml", "extends: bad.yaml\nname: c\n")
    assert launch_refuses(capsys, str(child)) == f"{expected} {offset}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "child.yaml"]


@pytest.mark.parametrize(
    ("item", "key", "got"),
    [
        ("optim.lr=1e400", "optim.lr", "a string '1e400'"),  # past a float's range: inf
        ("optim.lr=.inf", "optim.lr", "a number inf"),
        ("optim.weight_decay=.nan", "optim.weight_decay", "a number nan"),  # nan >= 0 is False
        ("optim.betas=[0.9, -.inf]", "optim.betas[1]", "a number -inf"),  # no bounds here
        ("train.grad_clip=.inf", "train.grad_clip", "a number inf"),  # null is "no clipping"
        ("optim.lr=1" + "0" * 400, "optim.lr", "an integer 100000000"),  # float() overflows
    ],
)
def test_a_float_that_is_not_finite_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], item: str, key: str, got: str
) -> None:
    """No float setting takes inf or nan (a limit is turned off by null): such a value would
    pass a `> 0` check and surface only as a NaN loss steps later; in a file or an override."""
    line = launch_refuses(capsys, str(ROOT / "recipes/finetune.yaml"), item)
    assert f" (override {item[:77]}" in line and f": {key}: expected a finite number" in line
    assert f"got {got}" in line and len(line) < 300
    path = write(tmp_path / "r.yaml", "task: mae\noptim: {lr: .inf}\n")
    assert launch_refuses(capsys, str(path)) == (
        f"{path}: optim.lr: expected a finite number, got a number inf"
    )


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("task: mae\n? [1]\n: 2\n", " (line 2)", "found unhashable key"),  # was a TypeError
        ("task: mae\nname: 2024-13-01\n", "", "month must be in 1..12"),  # a bad timestamp
        ("task: mae\ntrain: {seed: " + "9" * 5000 + "}\n", "", "Exceeds the limit (4300 digits)"),
    ],
)
def test_yaml_that_python_cannot_build_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str, problem: str
) -> None:
    """YAML that parses but whose values Python refuses to build is an invalid-YAML line naming
    the file, not a TypeError or ValueError traceback."""
    path = write(tmp_path / "r.yaml", text)
    msg = launch_refuses(capsys, str(path))
    assert msg.startswith(f"{path}{line}: invalid YAML: {problem}") and "sys." not in msg


def test_an_override_python_cannot_build_is_refused_by_the_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 5000-digit number in an override is kept as text (not a ValueError traceback), which
    the schema then refuses in one short line."""
    item = "train.seed=" + "9" * 5000
    msg = launch_refuses(capsys, str(ROOT / "recipes/finetune.yaml"), item)
    assert ": train.seed: expected an integer, got a string '999" in msg and len(msg) < 400


def test_the_vit_from_scratch_is_the_classify_finetune_but_for_its_init() -> None:
    """The scratch control answers "what is the pretraining worth" only if nothing else
    differs: every resolved key of recipes/classify/scratch.yaml equals the finetune's, bar the
    name, the report label and init.from (the finetune's, the pretraining run; the scratch's,
    none)."""
    classify = ROOT / "recipes" / "classify"
    finetune = recipe.to_dict(recipe.load(classify / "finetune.yaml"))
    scratch = recipe.to_dict(recipe.load(classify / "scratch.yaml"))
    assert finetune["init"]["from"] == "runs/pretrain" and scratch["init"]["from"] is None
    for doc in (finetune, scratch):
        del doc["name"], doc["label"], doc["init"]["from"]
    assert scratch == finetune


def test_the_demo_trains_its_convolutions_channels_last_and_each_study_in_one_layout() -> None:
    """The demo's speed settings (benchmarks/RESULTS.md, throughput): its convolutional models
    channels-last, the others as they were; a study's arms all in one layout, the default one
    its published numbers were measured in, whichever demo recipe each arm extends."""
    demo = ROOT / "recipes" / "demo"
    conv = ("edsr", "rcan", "classify_cnn", "finetune", "finetune_scratch", "finetune_frozen_mae",
            "finetune_frozen_encoder")  # fmt: skip
    for name in conv:
        assert recipe.load(demo / f"{name}.yaml").train.channels_last, name
    for name in ("pretrain", "classify_scratch", "classify_probe", "classify_finetune"):
        assert not recipe.load(demo / f"{name}.yaml").train.channels_last, name
    for arms in (("cnn", "scratch", "finetune"), ("srmae_pretrained", "srmae_scratch")):
        layouts = {recipe.load(demo / "study" / f"{a}.yaml").train.channels_last for a in arms}
        assert layouts == {False}, arms

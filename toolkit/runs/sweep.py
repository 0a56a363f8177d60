"""Sweeps: the variants of a recipe over the product of swept values, each its own run.

    python -m toolkit.launch RECIPE --sweep optim.lr=1e-4,3e-4,1e-3 --sweep train.seed=0,1,2
    python -m toolkit.launch RECIPE --sweep sweep.yaml        # sweep: {optim.lr: [1e-4, 3e-4]}

Each variant is the recipe with its swept `key=value` overrides, trained in its own run
directory under the recipe's run.dir (the sweep's directory), named by those overrides:
`runs/debug/optim.lr=0.0003,train.seed=1`. The sweep's directory keeps `sweep.json` (the swept
keys, their values, every variant and its run directory), from which `toolkit.report` groups
the runs by the swept keys other than the seed and shows mean and std over seeds.

The key `recipe` sweeps the recipe itself: its values are recipe files (on the command line,
paths from the current directory; in a sweep file, from that file's folder), each variant's
base, for modes that differ in several keys at once (a CNN, a ViT from scratch, a linear probe,
a full finetune). Its variants are named by the file's stem
(`recipe=cnn,data.per_class=10,train.seed=0`); `toolkit.cluster.sweeps` checks that the files
agree on what one sweep shares (task, run.dir, cluster).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolkit.core import config
from toolkit.core.atomic import write_atomic
from toolkit.core.errors import UserError

SWEEP = "sweep.json"
RECIPE = "recipe"  # the swept key whose values are recipe files, not overrides
SEED = "train.seed"  # runs that differ in this key alone are repeats: averaged by the report
MAX_VARIANTS = 1000  # a product past this is a typo, not a sweep
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, Lustre, GPFS alike)
_NOT_SWEPT = ("run.dir", "cluster")  # one directory per variant; one job shape per array
_FILE_KEYS = ("sweep",)  # a sweep file's top-level keys
_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Variant:
    index: int
    overrides: tuple[str, ...]  # the swept key=value pairs, in the order the keys were given

    @property
    def name(self) -> str:
        """Its run directory's name: the overrides as `shown`, "/" (which would nest folders)
        as "_"."""
        return ",".join(shown(o) for o in self.overrides).replace("/", "_")

    @property
    def recipe(self) -> str | None:
        """Its recipe file where the sweep varies the recipe, else None (the launch's)."""
        return next((o.partition("=")[2] for o in self.overrides
                     if o.startswith(f"{RECIPE}=")), None)  # fmt: skip

    @property
    def settings(self) -> list[str]:
        """Its overrides of recipe keys (all but a swept recipe file)."""
        return [o for o in self.overrides if not o.startswith(f"{RECIPE}=")]


def shown(override: str) -> str:
    """An override as names and reports show it: a swept recipe file by its stem
    (`recipe=cnn`), which a folder name can hold and a reader can read."""
    key, _, value = override.partition("=")
    return f"{key}={Path(value).stem}" if key == RECIPE else override


def _split(values: str) -> list[str]:
    """Comma-separated values; commas inside [...] or {...} (a list value) do not split."""
    out, depth, current = [], 0, ""
    for ch in values:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [*out, current]


def _text(value: Any) -> str:
    """A YAML value as the override text that gives it back."""
    if isinstance(value, str):
        return value
    # A scalar is dumped as "1\n...\n" (a document end): drop that marker, then the newline.
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("...\n").strip()


def _from_file(path: Path) -> dict[str, list[str]]:
    """A sweep file's swept values, read by the recipes' strict reader (a key given twice, bad
    YAML, a file that is not UTF-8: one line naming the file) so a typo is never ignored."""
    expected = "a mapping `sweep: {key: [value, ...], ...}`"
    doc = config.read_yaml(path, what="sweep", expected=expected)
    for key in doc:
        if key not in _FILE_KEYS:
            hint = config.suggest(str(key), _FILE_KEYS)
            raise UserError(f"{path}: {key}: unknown key{hint}")
    sweep = doc.get("sweep")
    if not isinstance(sweep, dict) or not sweep:
        got = "an empty mapping" if sweep == {} else config.kind(sweep)
        raise UserError(f"{path}: sweep: expected a mapping {{key: [value, ...], ...}}, got {got}")
    axes = {}
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: sweep.{key}: expected a list of values, got {values!r}")
        axes[str(key)] = [_text(v) for v in values]
        if key == RECIPE:  # like `extends`: relative to the file that names them, so a study's
            # sweep file works from any directory and from the installed package's recipes
            axes[RECIPE] = [str(path.parent / v) if v.strip() else v for v in axes[RECIPE]]
    return axes


def _overlap(a: str, b: str) -> bool:
    """Whether setting dotted key `a` and setting `b` touch the same value (equal keys, or one
    a section holding the other: `optim` and `optim.lr`), so applying one would drop the
    other's value; the only test of clashing keys, for all three of parse's checks."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def parse(specs: list[str], overrides: Sequence[str] = ()) -> dict[str, list[str]]:
    """`--sweep` arguments (`key=v1,v2,...` or a YAML file with a `sweep:` mapping) -> the
    values of each swept key, in the order given. Everything that can be known before a
    variant is resolved is checked here, so a bad sweep writes nothing: keys swept twice or
    also set by one of the launch's `overrides` (whose value a variant would silently drop),
    keys that cannot be swept, values empty or equal (after stripping, or as override text),
    the number of variants, and their run directories' names (one each, and a valid name)."""
    axes: dict[str, list[str]] = {}
    where: dict[str, str] = {}  # each swept key's origin, for messages: the flag or the file
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep and spec.endswith(_FILE_SUFFIXES):
            found = {k: (f"{spec}: sweep.{k}", vs) for k, vs in _from_file(Path(spec)).items()}
        elif sep:
            found = {key.strip(): (f"--sweep {key.strip()}", _split(values))}
        else:
            raise UserError(f"--sweep {spec}: expected key=v1,v2,... or a .yaml sweep file")
        for k, (origin, vs) in found.items():
            clash = next((other for other in axes if _overlap(k, other)), None)
            if clash is not None:
                raise UserError(f"{origin}: swept twice (also by {where[clash]})")
            if any(_overlap(k, p) for p in _NOT_SWEPT):
                raise UserError(
                    f"{origin}: cannot be swept (each variant has its own run.dir, and the "
                    "variants of an array share one job shape)"
                )
            fixed = next((o for o in overrides if _overlap(k, o.partition("=")[0].strip())), None)
            if fixed is not None:
                raise UserError(
                    f"{origin}: also set by the override {fixed}, whose value every variant "
                    "would drop: expected the key swept or overridden, not both"
                )
            vs = [v.strip() for v in vs]  # "x,x " is two x's: compare what the variants get
            if "" in vs or len(set(vs)) != len(vs):
                raise UserError(f"{origin}: expected distinct, non-empty values, got {vs}")
            if k == RECIPE and not all(v.endswith(_FILE_SUFFIXES) for v in vs):
                raise UserError(f"{origin}: expected recipe files (.yaml/.yml), got {vs}")
            if any("\0" in v for v in vs):  # from a file's "\0": no file name can hold one
                raise UserError(f"{origin}: expected values without a NUL character")
            axes[k], where[k] = vs, origin
    count = 1
    for vs in axes.values():
        count *= len(vs)
    if count > MAX_VARIANTS:
        raise UserError(f"--sweep: {count} variants; at most {MAX_VARIANTS} in one sweep")
    _check_names(variants(axes), where)
    return axes


def _check_names(vs: list[Variant], where: dict[str, str]) -> None:
    """Each variant's run directory name is a file name of its own: two variants in one
    directory would overwrite each other's checkpoints and count twice in the report, and a
    name the file system refuses would fail only after sweep.json was written. `where`: each
    swept key's origin, in the order of the variants' overrides."""
    keys = list(where)
    seen: dict[str, Variant] = {}
    for v in vs:
        size = len(os.fsencode(v.name))  # fsencode: bytes of argv that were not UTF-8 too
        if size > NAME_MAX:
            key = max(zip(keys, v.overrides, strict=True), key=lambda ko: len(ko[1]))[0]
            raise UserError(
                f"{where[key]}: the run directory name of variant {v.index} ({v.name[:40]!r}...) "
                f"is {size} bytes: expected values short enough for a file name ({NAME_MAX})"
            )
        if v.name in seen:
            key, a, b = next(
                (k, x, y)
                for k, x, y in zip(keys, seen[v.name].overrides, v.overrides, strict=True)
                if x != y
            )
            raise UserError(
                f"{where[key]}: {a!r} and {b!r} give one run directory name, {v.name!r} (a '/' "
                "becomes '_'): expected values whose names differ"
            )
        seen[v.name] = v


def variants(axes: dict[str, list[str]]) -> list[Variant]:
    """Every combination, the last key varying fastest."""
    keys = list(axes)
    return [
        Variant(i, tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True)))
        for i, combo in enumerate(itertools.product(*(axes[k] for k in keys)))
    ]


def write(base: Path, recipe_path: str | None, axes: dict[str, list[str]], vs: list[Variant],
          array: str | None = None) -> Path:  # fmt: skip
    """Record the sweep in its directory (what the report reads)."""
    base.mkdir(parents=True, exist_ok=True)
    doc = {
        "recipe": recipe_path,
        "axes": axes,
        "variants": [
            {"index": v.index, "name": v.name, "overrides": list(v.overrides)} for v in vs
        ],
        "array": array,
    }
    write_atomic(base / SWEEP, json.dumps(doc, indent=2) + "\n")
    return base / SWEEP


def read(base: Path) -> dict[str, Any] | None:
    """A sweep directory's record, or None where `base` is not one."""
    path = base / SWEEP
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read the sweep record: {err.strerror}") from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"{path}: not a sweep record ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("variants"), list):
        raise UserError(f"{path}: not a sweep record (expected its axes and variants)")
    for i, v in enumerate(doc["variants"]):
        # The report joins each name to the sweep's directory and reads each override: a
        # record edited by hand or cut short is refused here, not a TypeError there.
        name = v.get("name") if isinstance(v, dict) else None
        overrides = v.get("overrides") if isinstance(v, dict) else None
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or "/" in name
            or not isinstance(overrides, list)
            or not all(isinstance(o, str) for o in overrides)
        ):
            raise UserError(
                f"{path}: variants[{i}]: expected a mapping with a `name` (a run directory in "
                f"the sweep's) and a list of `overrides` (key=value texts), got {_short(v)}"
            )
    return doc


def _short(value: Any) -> str:
    """A value for a one-line message: its JSON, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def swept_of(run_dir: Path) -> dict[str, str] | None:
    """A run's swept `key: value` texts (the seed too), from the sweep.json of the directory
    holding it where one of its variants is that run directory; None for a run outside a sweep.
    A run learns it is a variant this way, not from its overrides: the launch passes the swept
    ones and the fixed ones alike, and only the record tells them apart."""
    run_dir = Path(run_dir)
    try:
        record = read(run_dir.parent)
    except UserError:  # a broken record must not fail a run at its end: no hparams then
        return None
    if record is None:
        return None
    for v in record["variants"]:
        if v["name"] == run_dir.name:
            return dict(o.partition("=")[::2] for o in v["overrides"])
    return None


def value_at(doc: dict[str, Any], key: str) -> Any:
    """The value at dotted `key` of a recipe's plain data (`recipe.to_dict`); None if absent."""
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc

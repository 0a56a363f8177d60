"""The floors of the package point one way: every import in every module (top level or inside a
function) goes to its own floor or one below, no command imports another, and nothing imports in
a circle. The order is declared once, here, and docs/architecture.md shows the same."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib

from toolkit import MOVED

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "toolkit"

# Lowest first. A module may import its own floor and those below; never one above.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("toolkit.core",)),
    ("data", ("toolkit.data",)),
    ("models", ("toolkit.models",)),
    ("tasks", ("toolkit.tasks",)),
    ("engine", ("toolkit.engine",)),
    ("runs", ("toolkit.runs",)),
    ("services", ("toolkit.prediction", "toolkit.reporting", "toolkit.cluster")),
    ("commands", ()),  # the modules at the package root: python -m toolkit.<command>
)
NAMES = [name for name, _ in FLOORS]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(package.rglob("*.py"))}
    return {m: p for m, p in found.items() if not m.startswith("toolkit.recipes")}  # YAML only


def commands(package: Path = PACKAGE) -> set[str]:
    return {f"toolkit.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}


def floor_of(module: str, package: Path = PACKAGE) -> int:
    if module == "toolkit":  # the package's __init__: imports nothing of its own
        return 0
    if module in commands(package):
        return NAMES.index("commands")
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is on no floor: add its folder to FLOORS and the docs")


def imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for each toolkit module `path` imports, wherever the import statement is."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in found if m == "toolkit" or m.startswith("toolkit.")]


def upward(package: Path = PACKAGE) -> list[str]:
    known = modules(package)
    problems = []
    for module, path in known.items():
        mine = floor_of(module, package)
        for line, target in imports(path, known):
            if target == "toolkit":
                continue  # the package itself (its __init__ is on the lowest floor)
            theirs = floor_of(target, package)
            where = f"{path.relative_to(package.parent)}:{line}"
            if theirs > mine:
                problems.append(f"{where}: {module} ({NAMES[mine]}) imports {target} "
                                f"({NAMES[theirs]}), a floor above")  # fmt: skip
            elif mine == theirs == NAMES.index("commands") and target != module:
                problems.append(f"{where}: the command {module} imports the command {target}; "
                                "move what they share into a library")  # fmt: skip
    return problems


def circles(package: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    known = modules(package)
    graph = {m: sorted({t for _, t in imports(p, known) if t in known and t != m})
             for m, p in known.items()}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_or_across():
    assert upward() == []


def test_no_module_imports_in_a_circle():
    assert circles() == []


def test_the_test_finds_an_upward_import_and_a_circle(tmp_path):
    # The checks on a copy of the package with one import added: an engine module reaching up
    # to a command, and a data module importing one that imports it back.
    import shutil

    copy = tmp_path / "toolkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "recipes"))
    accel = copy / "engine" / "accel.py"
    accel.write_text(accel.read_text() + "\n\ndef _later():\n    from toolkit.launch import main\n")
    fmt = copy / "data" / "format.py"
    fmt.write_text(fmt.read_text() + "\nfrom toolkit.data import loader  # noqa\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = upward(copy)
        assert len(found) == 1 and found[0].startswith("toolkit/engine/accel.py:"), found
        assert "imports toolkit.launch (commands), a floor above" in found[0]
        assert ["toolkit.data.format", "toolkit.data.loader"] in [
            [m for m in c if m in ("toolkit.data.format", "toolkit.data.loader")] for c in
            circles(copy)]  # fmt: skip
    finally:
        ROOT = saved


def test_commands_are_the_package_root_and_the_console_scripts_name_them():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {value.partition(":")[0] for value in scripts.values()}
    assert targets == commands(), targets ^ commands()  # a console script for every command
    assert all(value.endswith(":main") for value in scripts.values())


def test_the_architecture_notes_list_the_floors_in_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. \*\*(\w+)\*\*", section, flags=re.M)
    assert listed == NAMES
    for _, prefixes in FLOORS:
        for prefix in prefixes:
            assert f"`{prefix.replace('.', '/')}/`" in section, prefix


def test_an_old_import_path_gives_the_module_it_moved_to():
    # In a fresh interpreter (nothing imported yet): each old name must load the new module
    # itself, not a copy, and warn once with what to write.
    code = """
import importlib, json, warnings
from toolkit import MOVED
out = {}
for old, new in sorted(MOVED.items()):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = [module is importlib.import_module(new), [str(w.message) for w in seen
                if w.category is DeprecationWarning]]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert sorted(found) == sorted(MOVED)
    for old, (same, warned) in found.items():
        assert same, f"{old} is not {MOVED[old]}"
        assert warned == [f"{old} moved to {MOVED[old]}: import that instead"], (old, warned)


def test_the_old_runs_module_names_and_lensing_command_still_work():
    from toolkit.engine.model import build_model
    from toolkit.runs import build_model as old_build
    from toolkit.runs import locate
    from toolkit.runs.directory import locate as new_locate

    assert old_build is build_model and locate is new_locate
    done = subprocess.run([sys.executable, "-m", "toolkit.data.lensing", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "python -m toolkit.simulate" in done.stdout, done.stderr


def test_the_architecture_notes_name_every_module():
    # The rooms block is the tree: a module added without its line there fails here.
    text = (ROOT / "docs" / "architecture.md").read_text()
    rooms = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    missing = [str(p.relative_to(PACKAGE)) for m, p in modules().items()
               if p.name != "__init__.py" and p.name not in rooms]  # fmt: skip
    assert missing == []

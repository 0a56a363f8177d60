"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
venv, gives every command as a console script and finds the recipes it ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

COMMANDS = ["launch", "train", "shard", "evaluate", "report", "predict", "simulate", "demo"]


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python3*/site-packages"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; the heavy dependencies (torch, ...) are borrowed from
    the test's own environment by a .pth line, not installed again."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # what a source distribution holds; the build writes nothing here
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("toolkit", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist"), str(source)], check=True)  # fmt: skip
    (wheel,) = (root / "dist").glob("srmae_toolkit-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True)  # fmt: skip
    borrowed = sysconfig.get_paths()["purelib"]
    (site_packages(venv) / "borrowed.pth").write_text(borrowed + "\n")
    return venv


def run(venv: Path, *cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_the_installed_package_is_not_the_checkout(venv: Path, tmp_path: Path) -> None:
    proc = run(venv, str(venv / "bin/python"), "-c", "import toolkit; print(toolkit.__file__)",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(site_packages(venv))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_console_script(venv: Path, tmp_path: Path, command: str) -> None:
    proc = run(venv, str(venv / "bin" / f"srmae-{command}"), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")


def test_shipped_recipes_dry_run_from_anywhere(venv: Path, tmp_path: Path) -> None:
    shipped = site_packages(venv) / "toolkit" / "recipes"
    expected = sorted(p.relative_to(ROOT / "recipes") for p in (ROOT / "recipes").rglob("*.yaml"))
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == expected
    for recipe in (
        "debug.yaml",
        "demo/pretrain.yaml",
        "baselines/edsr.yaml",
        "demo/classify_probe.yaml",
        "demo/study/finetune.yaml",  # the study's recipes: a folder of their own in the wheel
    ):
        proc = run(venv, str(venv / "bin/srmae-launch"), str(shipped / recipe), "--local",
                   "--dry-run", "--json", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["params"]["total"] > 0
    # The demo finds its recipes in the installed package, not in a checkout.
    code = "from toolkit import demo; print(demo.RECIPES)"
    proc = run(venv, str(venv / "bin/python"), "-c", code, cwd=tmp_path)
    assert Path(proc.stdout.strip()) == shipped / "demo"

"""Small data and recipe helpers shared by the tests (tiny images, real code paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = ROOT / "recipes" / "debug.yaml"
EDSR_RECIPE = ROOT / "recipes" / "baselines" / "edsr.yaml"
# A one-block EDSR: it sees 5.5 LR pixels around each output pixel.
TINY_EDSR = ("model.n_feats=8", "model.n_resblocks=1", "model.img_size=32")

# A ViT small enough for sub-second model tests: 20x20 images, 25 patches of 4x4.
TINY_VIT = dict(
    img_size=20,
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
)


# scikit-image's structural_similarity as toolkit.core.images defines SSIM: the reference the
# tests check SSIM against.
SKIMAGE_SSIM = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False,
                "data_range": 1.0}  # fmt: skip


def make_pairs(root: Path, count: int, size: int = 32, scale: int = 2, seed: int = 0) -> Path:
    """Smooth random HR images with LR = block means, written as paired .npy files."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for side in ("hr", "lr"):
        (root / side).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        fx, fy, phase = rng.uniform(1, 4, size=3)
        hr = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * x + phase)) * np.cos(2 * np.pi * fy * y)
        hr = (hr + 0.05 * rng.standard_normal((size, size))).clip(0, 1).astype(np.float32)
        lr = hr.reshape(size // scale, scale, size // scale, scale).mean(axis=(1, 3))
        np.save(root / "hr" / f"{i:04d}.npy", hr)
        np.save(root / "lr" / f"{i:04d}.npy", lr.astype(np.float32))
    return root


def make_shards(
    root: Path,
    count: int | tuple[int, ...],
    *,
    images: Callable[[Path, int | tuple[int, ...]], object] = make_pairs,
    out: str = "shards",
    **shard_args: object,
) -> Path:
    """A small shard set: `images(root / "src", count)` (make_pairs: `count` LR/HR pairs)
    sharded by toolkit.shard with `shard_args` (val_fraction, shard_size, ...) into
    root / out, which it returns."""
    from toolkit.data.sharding import shard

    images(root / "src", count)
    shard(root / "src", root / out, **shard_args)
    return root / out


# Turn the debug recipe's tiny MAE into a tiny SR-MAE (the same ViT, 8 channels of SR layers).
SR = ("task=sr", "model.arch=srmae", "model.sr_channels=8", "train.loss=l1")


def tiny(shards: Path, run_dir: Path, *extra: str, task: str = "sr") -> list[str]:
    """Overrides that turn the debug recipe into a seconds-long run on `shards`: SR-MAE for
    task "sr", the debug recipe's MAE for "mae"."""
    out = [
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "data.batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
    ]
    out += SR if task == "sr" else [f"task={task}"]
    return out + list(extra)


def cli_env(**env: str) -> dict[str, str]:
    """This process's environment with the checkout importable, and `env` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **env}


def run_main(
    capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int], *argv: object
) -> tuple[int, str, str]:
    """A command's `main` run in this process on `argv` (as strings): (exit status, what it
    printed to stdout, to stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(
    module: str,
    *args: str,
    cwd: Path | None = None,
    stdout: int = subprocess.PIPE,
    start_new_session: bool = False,
    **env: str,
) -> subprocess.Popen:
    """Start `python -m module args` in a subprocess with the checkout importable (cli_env),
    stderr into `stdout` (a pipe to read, unless subprocess.DEVNULL)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=start_new_session,
    )


def run_ok(module: str, *args: str, **env: str) -> str:
    """`python -m module args` run to its end (run_cli), which must exit 0; its output."""
    proc = run_cli(module, *args, **env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_command(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`argv` run to its end with no stdin (never shared with what it starts): its exit
    status, and its stdout and stderr apart, as text. Whatever the status: the test checks it."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli(
    module: str,
    *args: str,
    cwd: Path | None = None,
    timeout: float = 600,
    python: str = sys.executable,
    **env: str,
) -> subprocess.CompletedProcess:
    """`python -m module args` run to its end (run_command) with the checkout importable
    (cli_env); `python`, the interpreter."""
    return run_command(python, "-m", module, *args, cwd=cwd, env=cli_env(**env), timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_steps(run_dir: Path) -> list[int]:
    """The steps whose training loss a run has logged so far, in order."""
    log = run_dir / "metrics.jsonl"
    return [x["step"] for x in read_jsonl(log) if "train/loss" in x] if log.exists() else []


def evaluate_json(*args: str) -> dict:
    """`python -m toolkit.evaluate ARGS --json` in a subprocess; its summary."""
    out = run_ok("toolkit.evaluate", *args, "--json")
    return json.loads(out[out.index("{\n") : out.rindex("}") + 1])


def make_run(run_dir: Path, *overrides: str, base: Path = DEBUG_RECIPE, seed: int = 0) -> Path:
    """A run directory as a finished training leaves it (recipe.yaml and model.safetensors) for
    the recipe `base` with `overrides`, the model freshly initialised from `seed`: what
    `predict` and `evaluate` read, without the minutes of a training."""
    import torch
    from safetensors.torch import save_file

    from toolkit.engine.model import build_model
    from toolkit.runs import recipe

    r = recipe.load(base, [f"run.dir={run_dir}", *overrides])
    torch.manual_seed(seed)
    model = build_model(r)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.dump(r))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(run_dir / "model.safetensors"))
    return run_dir


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) by relative path, with its sha256: two
    digests are equal only if no file was added, removed or changed by a single byte."""
    import hashlib

    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(out: str) -> str:
    """The single `error:` line a refused command prints (asserting there is exactly one, and
    no traceback)."""
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


def hparams_of(tb_dir: Path) -> tuple[dict[str, object], list[str], dict[str, list[float]]]:
    """What TensorBoard's HParams dashboard reads from a run's event files, read back with
    TensorBoard's own reader: (the session's hyperparameter values, the metric tags the
    experiment names, each scalar tag's values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    values: dict[str, object] = {}
    metrics: list[str] = []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        for name, v in data.session_start_info.hparams.items():
            values[name] = getattr(v, v.WhichOneof("kind"))
        metrics += [m.name.tag for m in data.experiment.metric_infos]
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return values, metrics, scalars

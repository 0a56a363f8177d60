"""The training engine end to end: run directory, TensorBoard, exact resume after SIGKILL,
damaged checkpoints, two processes as one group, stage chaining, non-finite loss."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import (
    DEBUG_RECIPE,
    EDSR_RECIPE,
    TINY_EDSR,
    make_pairs,
    make_shards,
    one_error_line,
    read_jsonl,
    run_cli,
    tiny,
    tree_digest,
)
from toolkit import train as train_cli
from toolkit.data.sharding import shard
from toolkit.tasks import TASKS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("engine"), 40, val_fraction=0.2, shard_size=8)


def train(*overrides: str) -> int:
    return train_cli.main([str(DEBUG_RECIPE), *overrides])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_run_directory_tensorboard_and_metrics(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(*tiny(shards, run, "train.max_steps=6", "train.checkpoint_every=3")) == 0
    assert (run / "recipe.yaml").is_file() and (run / "model.safetensors").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000003", "step-00000006"]
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000006"
    ev = json_of(run / "eval.json")
    assert ev["split"] == "val"
    assert ev["count"] == json_of(shards / "manifest.json")["splits"]["val"]["count"]
    metrics = TASKS.get("sr").metrics  # what the SR task evaluates
    assert set(ev["model"]) == set(metrics) and set(ev["bicubic"]) == set(metrics) - {"loss"}
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/grad_norm",
        "train/images_per_s",
        "train/data_wait",
        "train/lr/default",
        "val/mse",
        "val/psnr",
        "val/ssim",
        "val/psnr_bicubic",
    } <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert acc.Tags()["images"] and acc.Images(acc.Tags()["images"][0])
    lines = read_jsonl(run / "metrics.jsonl")
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, 7))
    val = [x for x in lines if "val/psnr" in x][-1]
    assert val["val/psnr"] == pytest.approx(ev["model"]["psnr"])


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def complete_steps(run: Path) -> list[int]:
    """Steps of the checkpoints on disk that have their COMPLETE marker (read here, not
    through the checkpointer under test)."""
    dirs = (run / "checkpoints").glob("step-*")
    return sorted(int(d.name.removeprefix("step-")) for d in dirs if (d / "COMPLETE").is_file())


@pytest.mark.parametrize("subset", [(), ("data.limit=10",)], ids=["whole", "limit"])
def test_sigkill_then_relaunch_is_bit_identical(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, subset: tuple[str, ...]
) -> None:
    """SIGKILL once step 5 is logged (checkpoints every 2 steps of 14): the process died of it,
    mid-run (no export, no eval.json), with the checkpoint of step 4 or a later one complete;
    the relaunch resumes from exactly the newest complete checkpoint, redoes the steps after
    it, and ends with the losses and weights of a run never killed. On a subset of 10 samples
    too (3 batches an epoch: the checkpoints fall mid-epoch)."""
    args = ["train.max_steps=14", "train.checkpoint_every=2", "data.num_workers=1", *subset]
    ref = tmp_path / "ref"
    assert train(*tiny(shards, ref, *args)) == 0

    run = tmp_path / "killed"
    kill_after = 5  # between the checkpoints of steps 4 and 6
    proc = run_cli("toolkit.train", str(DEBUG_RECIPE), *tiny(shards, run, *args))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        steps = [x["step"] for x in read_jsonl(log) if "train/loss" in x] if log.exists() else []
        if steps and steps[-1] >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
    # Where it landed: past step 5 (so past the checkpoint of step 4), before the end.
    assert not (run / "model.safetensors").exists() and not (run / "eval.json").exists()
    done = complete_steps(run)
    assert done and 4 <= done[-1] < 14, done
    logged = max(x["step"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x)
    assert logged >= kill_after

    caplog.set_level("INFO")
    assert train(*tiny(shards, run, *args)) == 0  # relaunch: resumes by itself
    newest = run / "checkpoints" / f"step-{done[-1]:08d}"
    assert f"resumed from {newest} (step {done[-1]}," in caplog.text
    losses = [
        {x["step"]: x["train/loss"] for x in read_jsonl(d / "metrics.jsonl") if "train/loss" in x}
        for d in (ref, run)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 14
    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if subset:  # the same 10 samples in both, and 14 steps of 3 batches: 4.67 epochs
        assert json_of(run / "subset.json") == json_of(ref / "subset.json")
        assert len(json_of(run / "subset.json")["keys"]) == 10
        epochs = [x["epoch"] for x in read_jsonl(run / "metrics.jsonl") if "epoch" in x]
        assert epochs[-1] == pytest.approx(14 / 3)


def test_damaged_newest_checkpoint_falls_back(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    assert train(*tiny(shards, run, "train.max_steps=4", "train.checkpoint_every=2")) == 0
    newest = run / "checkpoints/step-00000004/optimizer.bin"
    newest.write_bytes(newest.read_bytes()[:100])
    caplog.set_level("INFO")
    assert train(*tiny(shards, run, "train.max_steps=6", "train.checkpoint_every=2")) == 0
    text = caplog.text
    assert "step-00000004 is damaged: optimizer.bin has 100 bytes" in text
    assert "resumed from" in text and "step-00000002" in text
    steps = [x["step"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone once, not logged twice


def test_two_local_processes_form_one_group(tmp_path: Path) -> None:
    """One step on a batch split over 2 ranks == one step of 1 process on the whole batch.

    Adam's first step is lr * g / (|g| + eps): with a large eps it is linear in the gradient,
    so float-order differences in the all-reduce stay small instead of flipping signs."""
    # 8 training samples: rank r of 2 takes positions 4r..4r+3, one process all 8 in one batch.
    shards = make_shards(tmp_path, 8, val_fraction=0.0, shard_size=3)
    common = [
        "train.max_steps=1",
        "data.shuffle_buffer=0",
        "train.grad_clip=null",
        "train.eval_every=1000",
        "optim.eps=1.0",
        "optim.lr=0.1",
    ]
    one, two, half = tmp_path / "one", tmp_path / "two", tmp_path / "half"
    assert train(*tiny(shards, one, "data.batch_size=8", *common)) == 0
    assert train(*tiny(shards, half, "data.batch_size=4", *common)) == 0
    proc = run_cli(
        "toolkit.launch",
        str(DEBUG_RECIPE),
        "--local",
        "--procs",
        "2",
        *tiny(shards, two, "data.batch_size=4", *common),
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "world 2" in out  # both processes joined one group of 2
    a, b, h = weights(one), weights(two), weights(half)
    init = initial_weights(tiny(shards, one, *common))

    def dist(x: dict, y: dict) -> float:
        return sum(((x[k] - y[k]).double() ** 2).sum().item() for k in x) ** 0.5

    step = dist(a, init)
    assert step > 1e-3  # the step really moved the weights
    # Equal up to float summation order (1 vs 2 threads, all-reduce), far below the step size;
    # rank 0's half alone trains to something else: rank 1's gradients were averaged in.
    assert dist(b, a) < 1e-4 * step
    assert dist(h, a) > 1e-2 * step


def initial_weights(overrides: list[str], base: Path = DEBUG_RECIPE) -> dict[str, torch.Tensor]:
    """The model every run starts from: the recipe's seed, as the engine seeds it."""
    from accelerate.utils import set_seed

    from toolkit.engine.model import build_model
    from toolkit.runs import recipe

    r = recipe.load(base, overrides)
    set_seed(r.train.seed)
    return build_model(r).state_dict()


def test_pretrain_frozen_full_chain(shards: Path, tmp_path: Path) -> None:
    pre, frozen, full = tmp_path / "pre", tmp_path / "frozen", tmp_path / "full"
    assert train(*tiny(shards, pre, "train.max_steps=3", task="mae")) == 0
    assert (
        train(*tiny(shards, frozen, "train.max_steps=3", f"init.from={pre}", "freeze=[encoder]"))
        == 0
    )
    assert train(*tiny(shards, full, "train.max_steps=3", f"init.from={frozen}")) == 0
    p, f, g = weights(pre), weights(frozen), weights(full)
    enc = [k for k in p if k.startswith("encoder.")]
    assert enc and all(torch.equal(p[k], f[k]) for k in enc)  # frozen: bit-identical
    assert any(not torch.equal(p[k], f[k]) for k in p if k.startswith("decoder."))
    assert any(not torch.equal(f[k], g[k]) for k in enc)  # the full finetune trains it
    # each run's eval.json is its own final model's
    assert json_of(full / "eval.json")["model"] != json_of(frozen / "eval.json")["model"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = run_cli(
        "toolkit.train",
        str(DEBUG_RECIPE),
        *tiny(
            shards,
            run,
            "train.max_steps=40",
            "train.checkpoint_every=1",
            "optim.lr=1e30",
            "train.grad_clip=null",
        ),
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    line = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "at step" in line[0] and "Traceback" not in out
    step = int(line[0].split("at step ")[1].split(";")[0])
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == f"step-{step - 1:08d}"  # nothing saved after the NaN
    assert not (run / "model.safetensors").exists()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path) -> None:
    """Two micro-batches of 4 accumulated make the same step as one batch of 8."""
    shards = make_shards(tmp_path, 8, val_fraction=0.0, shard_size=8)
    common = ["train.max_steps=1", "data.shuffle_buffer=0", "train.grad_clip=null",
              "optim.eps=1.0", "optim.lr=0.1"]  # fmt: skip
    big, acc = tmp_path / "big", tmp_path / "acc"
    assert train(*tiny(shards, big, "data.batch_size=8", *common)) == 0
    assert train(*tiny(shards, acc, "data.batch_size=4", "train.grad_accum=2", *common)) == 0
    a, b = weights(big), weights(acc)
    init = initial_weights(tiny(shards, big, *common))
    step = sum(((a[k] - init[k]).double() ** 2).sum().item() for k in a) ** 0.5
    diff = sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a) ** 0.5
    assert step > 1e-3 and diff < 1e-4 * step


def test_bf16_trains_and_exports_fp32(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(*tiny(shards, run, "train.max_steps=3", "train.precision=bf16")) == 0
    w = weights(run)
    assert all(v.dtype == torch.float32 for v in w.values())
    losses = [x["train/loss"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]
    assert len(losses) == 3 and all(0 < x < 1 for x in losses)


def test_a_norm_pix_mae_run_logs_its_training_loss_as_validation_loss(shards, tmp_path) -> None:
    """The logged val/loss is the mean, over the validation samples, of the exported model's
    own loss (norm_pix_loss included) with each sample's evaluation mask."""
    from toolkit.engine.model import build_model
    from toolkit.runs import recipe
    from toolkit.runs.directory import eval_loader
    from toolkit.tasks.mae import mask_noise

    run = tmp_path / "run"
    assert (
        train(*tiny(shards, run, "train.max_steps=2", "model.norm_pix_loss=true", task="mae")) == 0
    )
    r = recipe.load(run / "recipe.yaml")
    model = build_model(r).eval()
    model.load_state_dict(weights(run))
    losses = []
    with torch.no_grad():
        for batch in eval_loader(r, "val"):
            noise = mask_noise(batch["key"], model.patchify(batch["hr"]).shape[1], r.train.seed)
            out = model(batch["hr"], noise=noise)
            losses += out.sample_loss[batch["valid"]].tolist()
    logged = [x["val/loss"] for x in read_jsonl(run / "metrics.jsonl") if "val/loss" in x][-1]
    assert logged == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert len(losses) == json_of(run / "eval.json")["count"]


def test_no_read_of_a_tensor_inside_a_step(shards, tmp_path, monkeypatch) -> None:
    """The step queues its work and never waits for it: no toolkit code inside a step (the
    loop's step, the task, the model; fetching the batch, host work, aside) reads a tensor's
    value (item, tolist, float, int, bool, numpy, cpu), which on a GPU would wait for
    everything queued. Counted by wrapping those methods and attributing each call to the frame
    that made it; the loss is read a step late or at log steps, outside the step."""
    from toolkit.runs import loop

    toolkit = str(Path(loop.__file__).parents[1])
    inside, reads = [False], []
    real_step = loop.train_step

    def step(*args, **kwargs):
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False

    real_endless = loop._endless

    def endless(loader):
        batches = real_endless(loader)
        while True:
            was, inside[0] = inside[0], False  # the host's data pipeline is not counted
            batch = next(batches)
            inside[0] = was
            yield batch

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "_endless", endless)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(toolkit):
                reads.append(f"{_name} in {caller}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for task in ("sr", "mae"):
        run = tmp_path / task
        assert train(*tiny(shards, run, "train.max_steps=5", "train.log_every=100", task=task)) == 0
        logged = [x["step"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]
        assert logged == [5]  # read once, at the last step
    assert reads == []


# Compiled and eager training round float32 differently: inductor's fused C++ kernels (its own
# vectorised exp/erf, other summation orders, vector width set by the CPU's instruction set) are
# not ATen's and oneDNN's. Measured after 4 steps of the tiny SR-MAE (2 compiled + 2 eager, or 4
# compiled, against 4 eager), with the kernels of AVX-512 / AVX2 / no SIMD (oneDNN at AVX2 or
# SSE4.1), set by ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA:
#   |weights - eager weights| / |eager weights - initial weights| (L2 over all parameters):
#       8.7e-6 / 1.5e-5 / 1.7e-5 or 1.3e-5;
#   elementwise up to 5.3e-7 / 1.2e-6 / 1.1e-6 absolute, which an elementwise allclose(rtol=1e-4,
#       atol=1e-6) rejected on AVX2 and without SIMD;
#   losses, relative: 1.0e-7 / 0 / 1.9e-7 or 1.0e-7.
# Adam divides each gradient by its own running scale, so a rounding difference in a small
# gradient becomes a difference of the same relative size in its update: compared with how far
# training moved the weights the difference is 1e-5, whatever a single weight's size. Hence
# DRIFT = 1e-4 (6x the largest seen) and losses to 2e-6 (10x). By that measure the eager resume
# of a compiled run's checkpoint is 0.15 off when it loses the data position, 0.52 when it loses
# the Adam moments.
DRIFT = 1e-4
LOSS_REL = 2e-6


def drift(w: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], init: dict) -> float:
    """How far `w` is from `ref`, as a fraction of how far training moved `ref` from `init`."""
    assert w.keys() == ref.keys() == init.keys()
    apart = sum(((w[k] - ref[k]).double() ** 2).sum().item() for k in ref) ** 0.5
    moved = sum(((ref[k] - init[k]).double() ** 2).sum().item() for k in ref) ** 0.5
    assert moved > 1e-3  # trained: the measure means something
    return apart / moved


@pytest.mark.numeric
def test_compiled_runs_match_eager_and_checkpoints_cross_between_them(shards, tmp_path) -> None:
    """train.compile: the same losses and weights as eager (to float rounding: DRIFT,
    LOSS_REL); a compiled run resumed is exactly the compiled run straight through; a compiled
    run's checkpoint resumes eager (parameter names are the same) with its Adam moments and data
    position, ending where 4 eager steps do."""
    args = ["train.checkpoint_every=2", "data.shuffle_buffer=0"]
    compiled = ["train.compile=true"]
    eager, straight, resumed, mixed = (tmp_path / n for n in ("eager", "c", "cr", "mixed"))
    assert train(*tiny(shards, eager, "train.max_steps=4", *args)) == 0
    assert train(*tiny(shards, straight, "train.max_steps=4", *args, *compiled)) == 0
    assert train(*tiny(shards, resumed, "train.max_steps=2", *args, *compiled)) == 0
    assert train(*tiny(shards, resumed, "train.max_steps=4", *args, *compiled)) == 0
    assert train(*tiny(shards, mixed, "train.max_steps=2", *args, *compiled)) == 0
    assert train(*tiny(shards, mixed, "train.max_steps=4", *args)) == 0  # eager from compiled

    def losses(run: Path) -> list[float]:
        return [x["train/loss"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]

    assert losses(straight) == pytest.approx(losses(eager), rel=LOSS_REL, abs=0)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    init = initial_weights(tiny(shards, eager, "train.max_steps=4", *args))
    e = weights(eager)
    compiled_drift, mixed_drift = drift(a, e, init), drift(weights(mixed), e, init)
    assert compiled_drift < DRIFT and mixed_drift < DRIFT, (compiled_drift, mixed_drift)
    assert losses(mixed) == pytest.approx(losses(eager), rel=LOSS_REL, abs=0)


# Channels-last convolutions round differently from the default layout (oneDNN picks other
# kernels and sums in another order). Measured after 4 steps of the tiny EDSR, kernels of AVX2 /
# no SIMD (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): drift 5.6e-7 / 4.5e-7, losses 7.2e-8 / 7.2e-8
# relative. Hence CL_DRIFT = 1e-5 (18x the largest seen) and the losses to LOSS_REL (28x); a
# layout that moved a value (a wrong permutation) would be off by order 1.
CL_DRIFT = 1e-5


@pytest.mark.numeric
def test_channels_last_trains_like_the_default_layout_and_checkpoints_cross(
    shards: Path, tmp_path: Path
) -> None:
    """train.channels_last: the same losses and weights as the default layout (to float
    rounding); the exported weights and the checkpoints load in the default layout; a
    channels-last run resumed is exactly the one straight through."""
    edsr = [str(EDSR_RECIPE), f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0",
            "train.log_every=1", "train.eval_every=0", *TINY_EDSR, "train.checkpoint_every=2",
            "data.shuffle_buffer=0", "train.precision=no", "deepspeed=null"]  # fmt: skip
    cl = ["train.channels_last=true"]
    plain, straight, resumed, mixed = (tmp_path / n for n in ("plain", "cl", "clr", "mixed"))
    layouts: list[bool] = []  # per training forward of a convolution: its weight channels-last?

    def seen(module: torch.nn.Module, _: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.training:
            layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last))

    for run, steps, layout in ((plain, 4, []), (straight, 4, cl), (resumed, 2, cl),
                               (resumed, 4, cl), (mixed, 2, cl), (mixed, 4, [])):  # fmt: skip
        hook = torch.nn.modules.module.register_module_forward_pre_hook(seen)
        try:
            assert (
                train_cli.main([*edsr, f"run.dir={run}", f"train.max_steps={steps}", *layout]) == 0
            )
        finally:
            hook.remove()
        assert layouts and all(layouts) == bool(layout), (run, layout)  # the option takes effect
        layouts.clear()

    def losses(run: Path) -> list[float]:
        return [x["train/loss"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]

    assert losses(straight) == pytest.approx(losses(plain), rel=LOSS_REL, abs=0)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    init = initial_weights([*edsr[1:], f"run.dir={plain}"], base=EDSR_RECIPE)
    e = weights(plain)
    cl_drift, mixed_drift = drift(a, e, init), drift(weights(mixed), e, init)
    assert cl_drift < CL_DRIFT and mixed_drift < CL_DRIFT, (cl_drift, mixed_drift)
    assert losses(mixed) == pytest.approx(losses(plain), rel=LOSS_REL, abs=0)


def test_the_run_records_the_normalisation_it_trained_with(shards: Path, tmp_path: Path) -> None:
    """recipe.yaml says how values were mapped: the shards' default (unit for [0, 1] data,
    none for fluxes beyond it), or the recipe's own choice."""
    import numpy as np
    import yaml

    flux = make_pairs(tmp_path / "src", 12)
    for path in flux.rglob("*.npy"):
        np.save(path, np.load(path) * 40 - 5)  # sky-subtracted fluxes
    shard(flux, tmp_path / "flux", val_fraction=0.25, shard_size=8)
    runs = {
        "unit": tiny(shards, tmp_path / "a", "train.max_steps=1"),
        "none": tiny(tmp_path / "flux", tmp_path / "b", "train.max_steps=1"),
        "asinh:0.5": tiny(
            tmp_path / "flux", tmp_path / "c", "train.max_steps=1", "data.normalise=asinh:0.5"
        ),
    }
    for expected, overrides in runs.items():
        assert train(*overrides) == 0
        run_dir = Path(overrides[1].split("=", 1)[1])
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert saved["data"]["normalise"] == expected


def launch_local(*args: str) -> tuple[int, str]:
    """`python -m toolkit.launch DEBUG_RECIPE ARGS --local` in a subprocess: (status, output)."""
    proc = run_cli("toolkit.launch", str(DEBUG_RECIPE), "--local", *args)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_a_finished_run_stays_finished_whatever_the_world_size(shards, tmp_path) -> None:
    """The README's first-run commands, one after the other on one directory: a relaunch of a
    finished 1-process run, on 2 processes (through the launcher, and as torchrun/srun start
    every rank) or on 1, changes no byte of it and says in one line that it is complete; a
    relaunch asking for more steps trains on."""
    run = tmp_path / "run"
    args = tiny(shards, run, "train.max_steps=4", "train.checkpoint_every=2", task="mae")
    assert train(*args) == 0
    before = tree_digest(run)
    assert "model.safetensors" in before and "eval.json" in before
    for relaunch in (
        ["--procs", "2", *args],
        [*args],
        [*args, "data.scale=4"],  # a chain's shared override the MAE does not use
        [*args, f"data.shards={tmp_path / 'purged'}"],  # shards gone: data.json counts
    ):
        code, out = launch_local(*relaunch)
        said = [x for x in out.splitlines() if "complete (trained to its last step, 4, on 1" in x]
        assert code == 0 and len(said) == 1, out[-3000:]
        assert f"python -m toolkit.evaluate {run}" in said[0] and "run.dir=" in said[0]
        assert tree_digest(run) == before
    code, out = launch_local("--dry-run", "--json", *args)  # a dry run says what it would find
    warnings = json.loads(out[out.index("{") : out.rindex("}") + 1])["warnings"]
    assert code == 0 and any("complete (trained to its last step, 4" in w for w in warnings)
    # Every rank of a job started without the launcher (torchrun here, srun on Slurm).
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                   "toolkit.train", str(DEBUG_RECIPE), *args)  # fmt: skip
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.count("complete (trained to its last step") == 1, out
    assert tree_digest(run) == before
    assert train(*args, "train.max_steps=6") == 0  # more steps asked for: it trains on
    assert json_of(run / "checkpoints/step-00000006/train_state.json")["step"] == 6


def test_a_run_cut_short_at_its_end_is_finished_on_its_own_world_size(shards, tmp_path) -> None:
    """Training reached its last step but the export was not written (killed at the end): a
    relaunch on another number of processes, which would map the position to another step and
    train again, is refused in one line with nothing changed; on its own it writes the export,
    the same weights."""
    run = tmp_path / "run"
    args = tiny(shards, run, "train.max_steps=4", "train.checkpoint_every=2", task="mae")
    assert train(*args) == 0
    exported = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").unlink()
    before = tree_digest(run)
    code, out = launch_local("--procs", "2", *args)
    line = one_error_line(out)
    assert code == 2 and "last step (4) on 1 process(es)" in line and "relaunch it on 1" in line
    assert tree_digest(run) == before
    assert train(*args) == 0
    assert (run / "model.safetensors").read_bytes() == exported
    assert [x["step"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x] == [
        1,
        2,
        3,
        4,
    ]  # nothing trained again


def test_resume_with_stochastic_depth_is_bit_identical(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With model.drop_path set, a run resumed from its step-3 checkpoint (the later checkpoint
    and the outputs removed, as a kill would leave it) ends with the weights of the run never
    stopped: the drops come from the step's stream, not from whatever the global RNG held. The
    same run without stochastic depth ends elsewhere, so the setting reached the model."""
    args = ["train.max_steps=6", "train.checkpoint_every=3", "model.drop_path=0.5"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(*tiny(shards, ref, *args)) == 0
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    for name in ("model.safetensors", "eval.json"):
        (run / name).unlink()
    caplog.set_level("INFO")
    assert train(*tiny(shards, run, *args)) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-00000003'} (step 3," in caplog.text
    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"
    assert train(*tiny(shards, plain, *args, "model.drop_path=0.0")) == 0
    c = weights(plain)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_layer_decay_trains_with_its_per_layer_rates(shards: Path, tmp_path: Path) -> None:
    """optim.layer_decay through the whole engine (the live optimiser's groups checked against
    the recipe's, the schedule, the logged rates): the tiny SR-MAE (depth 2, optim.lr 5e-4,
    constant schedule) logs each layer's rate, 5e-4 x 0.5^(3 - layer)."""
    run = tmp_path / "run"
    assert train(*tiny(shards, run, "train.max_steps=2", "optim.layer_decay=0.5")) == 0
    lines = [x for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]
    rates = {k: v for k, v in lines[-1].items() if k.startswith("train/lr/")}
    assert rates == {f"train/lr/default layer {i}": pytest.approx(5e-4 * 0.5 ** (3 - i))
                     for i in range(4)}  # fmt: skip

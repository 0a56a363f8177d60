"""DeepSpeed through accelerate on 2 CPU processes (gloo): ZeRO 1/2/3 x fp32/bf16 train,
checkpoint and resume; the recipe's param groups survive; frozen weights stay exact; the export
is the live model; the stage chain runs under ZeRO-2."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DEBUG_RECIPE, evaluate_json, make_shards, read_jsonl, run_ok, tiny
from toolkit.runs import recipe
from toolkit.data.format import read_manifest
from toolkit.engine.accel import to_universal
from toolkit.engine.checkpointer import read_weights
from toolkit.engine.validate import validate
from toolkit.core.errors import UserError
from toolkit.engine.model import build_model
from toolkit.runs.directory import eval_loader
from toolkit.tasks import Placement, task_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ds"), 40, val_fraction=0.2, shard_size=8)


def launch(*overrides: str, procs: int = 2) -> str:
    args = ["--local", "--procs", str(procs)] if procs > 1 else ["--local"]
    return run_ok("toolkit.launch", str(DEBUG_RECIPE), *args, *overrides)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def ds(stage: int, precision: str) -> list[str]:
    return [
        f"deepspeed.zero_stage={stage}",
        f"train.precision={precision}",
        "train.checkpoint_every=2",
        "optim.groups=[{match: '^encoder\\.', lr: 8.0e-5}]",
    ]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_checkpoints_and_resumes(shards, tmp_path, stage, precision) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(*tiny(shards, straight, "train.max_steps=6", *ds(stage, precision)))
    launch(*tiny(shards, resumed, "train.max_steps=3", *ds(stage, precision)))
    out = launch(*tiny(shards, resumed, "train.max_steps=6", *ds(stage, precision)))
    assert "resumed from" in out and "step-00000003" in out
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:  # bit-exact in bf16 too: a resume that lost the Adam state or a step differs
        assert torch.equal(a[k], b[k]), k
    # The live optimiser kept the recipe's two learning rates (constant schedule in debug).
    lines = read_jsonl(straight / "metrics.jsonl")
    lrs = {k: v for x in lines for k, v in x.items() if k.startswith("train/lr/")}
    assert lrs == {"train/lr/optim.groups[0] '^encoder\\.'": 8e-5, "train/lr/default": 5e-4}
    assert_export_is_the_live_model(straight, tol=1e-5 if precision == "no" else 2e-2)


def assert_export_is_the_live_model(run_dir: Path, tol: float) -> None:
    """eval.json was computed by the live model at the end of training; the exported weights,
    loaded into a fresh model, must score the same on the same split."""
    r = recipe.load(run_dir / "recipe.yaml")
    model = build_model(r)
    model.load_state_dict(weights(run_dir))
    val = eval_loader(r, "val")
    result = validate(task_of(r), model.eval(), iter(val), Placement())
    live = json.loads((run_dir / "eval.json").read_text())["model"]
    assert result.model.summary()["mse"] == pytest.approx(live["mse"], rel=tol)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_frozen_weights_stay_exact_under_zero(shards, tmp_path, precision) -> None:
    pre, frozen = tmp_path / "pre", tmp_path / "frozen"
    launch(*tiny(shards, pre, "train.max_steps=2", task="mae"), procs=1)
    launch(
        *tiny(
            shards,
            frozen,
            "train.max_steps=4",
            f"init.from={pre}",
            "freeze=[encoder]",
            "deepspeed.zero_stage=1",
            f"train.precision={precision}",
            "train.checkpoint_every=2",
        )
    )
    p, f = weights(pre), weights(frozen)
    enc = [k for k in p if k.startswith("encoder.")]
    assert enc and all(torch.equal(p[k], f[k]) for k in enc)
    saved = load_file(str(frozen / "checkpoints/step-00000002/frozen.safetensors"))
    assert sorted(saved) == sorted(enc) and all(torch.equal(saved[k], p[k]) for k in enc)


def test_stage_chain_under_zero2(shards, tmp_path) -> None:
    pre, fz, full = tmp_path / "pre", tmp_path / "fz", tmp_path / "full"
    z2 = ["deepspeed.zero_stage=2", "train.precision=bf16"]
    launch(*tiny(shards, pre, "train.max_steps=2", *z2, task="mae"))
    launch(*tiny(shards, fz, "train.max_steps=2", f"init.from={pre}", "freeze=[encoder]", *z2))
    launch(*tiny(shards, full, "train.max_steps=2", f"init.from={fz}", *z2))
    val = read_manifest(shards).count("val")
    assert json.loads((full / "eval.json").read_text())["count"] == val  # every sample, once
    # evaluation reads a ZeRO checkpoint (shards gathered) as it reads the exported weights
    ckpt = evaluate_json(str(full / "checkpoints" / "step-00000002"))
    exported = evaluate_json(str(full / "model.safetensors"))
    assert ckpt["model"] == exported["model"] and ckpt["count"] == exported["count"] > 0


def adam_state(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value, Adam moments and step count in a ZeRO checkpoint, whatever
    the number of processes that wrote it (through DeepSpeed's universal conversion)."""
    folder = to_universal(ckpt, out) / "zero"
    state = {}
    for f in folder.glob("*/*.pt"):
        value = torch.load(f, weights_only=True)  # {"param": tensor, ...}; step.pt: a tensor
        state[f"{f.parent.name}/{f.stem}"] = value["param"] if isinstance(value, dict) else value
    return state


@pytest.mark.parametrize(
    ("zero", "frozen"), [(0, False), (2, False), (3, True)], ids=["ddp", "zero2", "zero3-frozen"]
)
def test_restart_on_fewer_then_more_processes(shards, tmp_path, zero, frozen) -> None:
    """A run restarted on another number of processes goes on from the same weights, schedule
    and data position; under ZeRO the Adam moments follow through a universal checkpoint, and
    frozen weights (which that layout leaves out) stay those of the pretrained model."""
    run, pre = tmp_path / "run", tmp_path / "pre"
    backend = [f"deepspeed.zero_stage={zero}"] if zero else ["deepspeed=null"]
    if frozen:
        launch(*tiny(shards, pre, "train.max_steps=2", task="mae"), procs=1)
        backend += [f"init.from={pre}", "freeze=[encoder]"]

    def step(procs: int, max_steps: int, *extra: str) -> str:
        return launch(*tiny(shards, run, f"train.max_steps={max_steps}", *backend, *extra),
                      procs=procs)  # fmt: skip

    def optimiser(step: int) -> dict[str, torch.Tensor]:
        return adam_state(run / "checkpoints" / f"step-{step:08d}", tmp_path / f"u{step}")

    def same_optimiser(old: dict[str, torch.Tensor] | None, after: int) -> None:
        if zero:  # the new layout's first checkpoint holds exactly the state it resumed from
            assert old is not None
            new = optimiser(after)
            assert old.keys() == new.keys() and any(k.endswith("/exp_avg_sq") for k in old)
            assert all(torch.equal(old[k], new[k]) for k in old)

    step(2, 2)
    two = weights(run)
    # 2 -> 1 process: step 2 of 2 ranks is step 4 of 1; running to 4 trains nothing, so the
    # export must be exactly the weights the 2-process run ended with.
    out = step(1, 4)
    assert "2 steps x 2 process(es) = 4 steps x 1" in out
    assert ("Adam moments), scheduler, step and data position restored" in out) == bool(zero)
    assert "RESET" not in out
    assert all(torch.equal(two[k], v) for k, v in weights(run).items())
    same_optimiser(optimiser(2) if zero else None, 4)
    step(1, 6)  # trains on
    one = weights(run)
    six = optimiser(6) if zero else None  # read now: the 2-process run writes a step 6 of its own
    assert any(not torch.equal(two[k], v) for k, v in one.items())
    # 1 -> 2 processes: step 6 -> 3. Step 3 is checkpointed in the new layout before training
    # on (a relaunch with max_steps 6 or less would find the run finished and leave it).
    out = step(2, 7, "train.checkpoint_every=3")
    assert "6 steps x 1 process(es) = 3 steps x 2" in out
    restored = read_weights(run / "checkpoints/step-00000003")
    assert all(torch.equal(one[k], v) for k, v in restored.items())
    same_optimiser(six, 3)
    state = json.loads((run / "checkpoints/step-00000003/train_state.json").read_text())
    assert state["world_size"] == 2
    assert not list((run / "checkpoints").glob(".universal-*"))  # the conversion is cleaned up
    step(2, 8)  # and training goes on from the restored state
    assert json.loads((run / "checkpoints/step-00000008/train_state.json").read_text())["step"] == 8
    if frozen:
        p, f = weights(pre), weights(run)
        enc = [k for k in p if k.startswith("encoder.")]
        assert enc and all(torch.equal(p[k], f[k]) for k in enc)


def one_process_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives one process, in this one; restored after the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():  # fmt: skip
        monkeypatch.setenv(key, value)


def test_restart_resets_the_optimiser_when_the_conversion_fails(
    shards, tmp_path, monkeypatch, caplog
) -> None:
    """Should DeepSpeed fail to convert a checkpoint (a layout it cannot reshape), the run goes
    on from the consolidated weights, and the log says exactly what was reset."""
    import toolkit.engine.accel as accel
    from toolkit.runs.loop import train

    run = tmp_path / "run"
    z2 = ["deepspeed.zero_stage=2"]
    launch(*tiny(shards, run, "train.max_steps=2", *z2))
    two = weights(run)

    def unsupported(checkpoint: Path, out: Path) -> Path:
        raise NotImplementedError("this layout cannot be converted")

    monkeypatch.setattr(accel, "to_universal", unsupported)
    one_process_here(monkeypatch)
    with caplog.at_level("INFO"):
        result = train(recipe.load(DEBUG_RECIPE, tiny(shards, run, "train.max_steps=4", *z2)))
    assert result.step == 4
    assert "this layout cannot be converted" in caplog.text
    assert "the optimiser state (Adam moments) was RESET" in caplog.text
    assert all(torch.equal(two[k], v) for k, v in weights(run).items())
    assert not list((run / "checkpoints").glob(".universal-*"))


def test_restart_stops_clearly_when_the_conversion_does_not_load(
    shards, tmp_path, monkeypatch
) -> None:
    """A conversion DeepSpeed then fails to load (here: its per-parameter files gone) stops
    the run with one line saying how to resume, and leaves the checkpoints as they were."""
    import toolkit.engine.accel as accel
    from toolkit.runs.loop import train

    run = tmp_path / "run"
    z2 = ["deepspeed.zero_stage=2"]
    launch(*tiny(shards, run, "train.max_steps=2", *z2))
    real = accel.to_universal

    def damaged(checkpoint: Path, out: Path) -> Path:
        folder = real(checkpoint, out)
        shutil.rmtree(folder / "zero")
        return folder

    monkeypatch.setattr(accel, "to_universal", damaged)
    one_process_here(monkeypatch)
    with pytest.raises(UserError, match=r"relaunch on 2 processes, the number that wrote it"):
        train(recipe.load(DEBUG_RECIPE, tiny(shards, run, "train.max_steps=4", *z2)))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]
    # the failed run left this process clean: another run trains in it
    after = train(recipe.load(DEBUG_RECIPE, tiny(shards, tmp_path / "after", "train.max_steps=1")))
    assert after.step == 1


def test_a_run_in_this_process_leaves_the_environment_as_it_found_it(shards, tmp_path) -> None:
    """A DeepSpeed run in a process that goes on (the demo, a notebook) gives itself a rank
    environment and accelerate adds its own; after the run, and after a run that fails once its
    group is formed, none of it is left to turn the next command this process starts into a
    rank of a group that no longer exists."""
    from toolkit.runs.loop import train

    assert "WORLD_SIZE" not in os.environ  # a lone process: the run makes its own environment
    before = dict(os.environ)
    z2 = ["deepspeed.zero_stage=2"]
    done = train(
        recipe.load(DEBUG_RECIPE, tiny(shards, tmp_path / "run", "train.max_steps=1", *z2))
    )
    assert done.step == 1
    assert dict(os.environ) == before
    assert not torch.distributed.is_initialized()
    missing = tmp_path / "no-shards"
    with pytest.raises(UserError, match="manifest"):
        train(recipe.load(DEBUG_RECIPE, tiny(missing, tmp_path / "failed", *z2)))
    assert dict(os.environ) == before
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("task", ["sr", "mae"])
def test_bf16_deepspeed_keeps_residual_loss_and_outputs_in_fp32(shards, task) -> None:
    """Under DeepSpeed bf16 the weights are bf16 and the matrix products run in bf16, but the
    SR output (bicubic skip plus residuals) and the per-sample losses come out in fp32."""
    from toolkit.engine.accel import Engine
    from toolkit.engine.optim import build_groups, build_optimizer, build_scheduler
    from toolkit.tasks import task_of

    r = recipe.load(DEBUG_RECIPE, [*tiny(shards, Path("unused"), task=task),
                                   "deepspeed.zero_stage=2", "train.precision=bf16"])  # fmt: skip
    engine = Engine(r.train, r.deepspeed, micro_batch=r.data.batch_size)
    try:
        model = build_model(r)
        optimizer = build_optimizer(build_groups(model, r.optim), r.optim)
        scheduler = build_scheduler(optimizer, r.optim.scheduler, steps_per_epoch=1, total_steps=1)
        model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler)
        assert next(model.parameters()).dtype == torch.bfloat16
        batch = next(iter(eval_loader(r, "train")))
        at = Placement(engine.device, engine.train_autocast)
        losses, out = task_of(r).losses(model, batch, at, torch.Generator().manual_seed(0))
        assert losses.dtype == torch.float32
        if task == "sr":
            assert out.dtype == torch.float32  # bicubic + residuals added in fp32
        else:
            assert out.sample_loss.dtype == torch.float32 and out.pred.dtype == torch.bfloat16
    finally:
        engine.abandon()


def test_layer_decay_and_drop_path_under_zero2_bf16(shards, tmp_path) -> None:
    """DeepSpeed's ZeRO-2 (bf16) keeps every per-layer group and its rate (the engine's group
    check passes, and the logged rates are the recipe's: encoder rule 8e-5 and default 5e-4,
    each times 0.5^(3 - layer) for the tiny SR-MAE of depth 2), and with stochastic depth a
    resume is still bit-exact."""
    extra = ("optim.layer_decay=0.5", "model.drop_path=0.3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(*tiny(shards, straight, "train.max_steps=4", *ds(2, "bf16"), *extra))
    launch(*tiny(shards, resumed, "train.max_steps=2", *ds(2, "bf16"), *extra))
    out = launch(*tiny(shards, resumed, "train.max_steps=4", *ds(2, "bf16"), *extra))
    assert "resumed from" in out and "step-00000002" in out
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = read_jsonl(straight / "metrics.jsonl")
    lrs = {k: v for x in lines for k, v in x.items() if k.startswith("train/lr/")}
    enc = "train/lr/optim.groups[0] '^encoder\\.' layer"
    want = {f"{enc} {i}": 8e-5 * 0.5 ** (3 - i) for i in range(4)}  # encoder.norm: layer 3
    want["train/lr/default layer 3"] = 5e-4  # decoder and SR layers: the top layer
    assert lrs == pytest.approx(want, rel=1e-12)

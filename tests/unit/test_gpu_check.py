"""benchmarks/gpu.py: the FLOPs its MFU uses against counts it does not make (an analytic one for a
small layer stack, FlopCounterMode over a real CPU training step of every architecture), the log
windows it times, its budget and exit status (`gpu.sh --cpu-smoke` end to end: in
tests/e2e/test_benchmarks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu
from tests.helpers import ROOT
from toolkit.engine.model import build_model
from toolkit.runs import recipe
from toolkit.tasks import Placement, task_of

VIT = ["model.img_size=20", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
       "model.num_heads=4", "model.decoder_embed_dim=16", "model.decoder_depth=1",
       "model.decoder_num_heads=2"]  # fmt: skip
# Every architecture the demo trains, tiny.
ARCHS = {
    "mae": ("recipes/demo/pretrain.yaml", VIT),
    "srmae": ("recipes/demo/finetune.yaml", [*VIT, "model.img_size=24"]),
    "edsr": ("recipes/demo/edsr.yaml", ["model.img_size=24", "model.n_feats=8"]),
    "rcan": ("recipes/demo/rcan.yaml", ["model.img_size=24", "model.n_feats=8"]),
    "vit_classifier": ("recipes/demo/classify_finetune.yaml", VIT),
    "cnn": ("recipes/demo/classify_cnn.yaml", ["model.img_size=24"]),
}
COMMON = ["init.from=null", "freeze=[]"]


def test_a_training_steps_flops_match_the_analytic_count_of_a_small_stack() -> None:
    n, c, side, hidden, out = 3, 4, 6, 16, 5
    model = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.Flatten(), nn.ReLU(),
                          nn.Linear(c * side * side, hidden), nn.ReLU(),
                          nn.Linear(hidden, out))  # fmt: skip
    x = torch.rand(n, 1, side, side)
    conv = 2 * n * c * side * side * 9  # 2 FLOPs per multiply-add, 9 per output pixel
    linear = 2 * n * (c * side * side * hidden + hidden * out)
    # Backward: every layer's weight gradient (as much as its forward) and the input gradient of
    # every layer but the first (the images need none).
    expected = conv + linear + conv + linear + linear
    assert gpu.step_flops(model, lambda m: m(x).square().mean()) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_train_flops_per_image_is_a_real_training_steps_count(arch: str) -> None:
    """The meta-device count MFU uses equals FlopCounterMode over one real CPU step (forward,
    loss, backward) on another batch size, with attention run as matrix products so the CPU's
    fused kernel, which the counter has no formula for, is counted too."""
    path, overrides = ARCHS[arch]
    ours = gpu.train_flops_per_image(path, [*COMMON, *overrides])
    r = recipe.load(ROOT / path, [*COMMON, *overrides])
    assert r.model.arch == arch
    torch.manual_seed(0)
    model, task, n = build_model(r).train(), task_of(r), 3
    batch = gpu.synthetic_batch(r, n, torch.device("cpu"))
    at, rng = Placement(torch.device("cpu")), torch.Generator().manual_seed(1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        task.train_loss(model, batch, at, rng).backward()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd, torch.no_grad():
        task.train_loss(model, batch, at, rng)
    assert ours == pytest.approx(step.get_total_flops() / n, rel=1e-9)
    # The "3 x forward" rule: backward is twice the forward for every layer but the first, whose
    # input gradient is not computed, so the ratio is at most 3; these models' first layer is a
    # small share of the work (a patch embedding, a 3x3 convolution of 1 channel).
    ratio = step.get_total_flops() / fwd.get_total_flops()
    assert 2.75 < ratio <= 3.0


def test_mfu_is_model_flops_per_second_over_the_peak() -> None:
    assert gpu.mfu(2e9, 250.0, 1.0) == pytest.approx(0.5)  # 5e11 FLOP/s of 1 TFLOP/s


def line(step: int, **extra: float) -> dict[str, Any]:
    return {"step": step, "time": float(step), **extra}


def test_the_timed_windows_leave_out_the_warm_up_and_a_checkpoint() -> None:
    lines = [line(10, **{"train/loss": 1.0, "train/images_per_s": 5.0}),
             line(20, **{"train/loss": 1.0, "train/images_per_s": 100.0}),
             line(20, **{"checkpoint/seconds": 3.0}),
             line(30, **{"train/loss": 1.0, "train/images_per_s": 60.0}),
             line(40, **{"train/loss": 1.0, "train/images_per_s": 110.0})]  # fmt: skip
    windows = gpu.steady_windows(lines)
    assert [(n, x["step"]) for n, x in windows] == [(10, 20), (10, 40)]


def test_expected_log_steps() -> None:
    assert gpu.expected_log_steps(40, 10) == [10, 20, 30, 40]
    assert gpu.expected_log_steps(25, 10) == [10, 20, 25]


def test_the_budget_estimates_from_what_ran() -> None:
    plan = gpu.plan_for(False, 40, 10)
    plain, compiled = gpu.CONFIGS[0], gpu.CONFIGS[4]
    assert gpu.estimate(plain, [], plan) == plan.first_guess_s
    rows = [{"compiled": False, "seconds": 50.0}, {"compiled": False, "seconds": 70.0}]
    assert gpu.estimate(plain, rows, plan) == 70.0
    assert gpu.estimate(compiled, rows, plan) == 70.0 + plan.compile_extra_s
    assert gpu.estimate(compiled, [*rows, {"compiled": True, "seconds": 150.0}], plan) == 150.0
    assert gpu.fits(80.0, 100.0) and not gpu.fits(81.0, 100.0)


def test_plan_steps_are_whole_log_windows() -> None:
    assert gpu.plan_for(False, 35, 10).steps == 40
    assert gpu.plan_for(False, 5, 10).steps == 20  # the warm-up window and one timed


def test_the_exit_status_tells_a_partial_check_from_a_failed_one() -> None:
    ok = {"config": "a", "status": "ok"}
    budget = {"config": "b", "status": "skipped (budget)"}
    smoke = {"config": "c", "status": "skipped (not in the CPU smoke)"}
    assert gpu.verdict([ok, smoke], {"resume": True})[0] == gpu.EXIT_OK
    code, summary = gpu.verdict([ok, budget], {"resume": True})
    assert code == gpu.EXIT_PARTIAL and "1 skipped (budget): b" in summary
    assert gpu.verdict([ok, budget], {"resume": False})[0] == gpu.EXIT_FAILED
    assert gpu.verdict([{"config": "d", "status": "timed out"}], {})[0] == gpu.EXIT_FAILED


def test_configurations_the_budget_cannot_hold_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run takes 100 s of a 450 s budget (20 s kept back): the first, its resume, two more;
    the rest would not fit and are reported skipped, with exit status 3."""
    clock = [0.0]

    def launch(config: gpu.Config, common: list[str], run_dir: Path, steps: int, log: Path,
               timeout: float) -> int:  # fmt: skip
        resumed = run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        first = steps if resumed else 10  # resumed: one window on from the checkpoint
        with (run_dir / "metrics.jsonl").open("a") as f:
            for s in range(first, steps + 1, 10):
                f.write(json.dumps(line(s, **{"train/loss": 1.0, "train/images_per_s": 9.0,
                                              "train/data_wait": 0.1})) + "\n")  # fmt: skip
        log.write_text(f"resumed from x (step {steps - 10}, epoch 0)\n" if resumed else "")
        clock[0] += 100.0
        return 0

    monkeypatch.setattr(gpu, "launch", launch)
    monkeypatch.setattr(gpu.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(gpu, "prepare_data", lambda work, plan: work / "shards")
    monkeypatch.setattr(gpu, "binding_check", lambda work: {"ok": True})
    monkeypatch.setattr(gpu, "train_flops_per_image", lambda path, overrides: 1e9)
    env = {"python": "3", "torch": "2.x", "cuda": "12", "cudnn": 9, "device": "NVIDIA H100",
           "driver": "1", "accelerate": "1", "deepspeed": "0"}  # fmt: skip
    monkeypatch.setattr(gpu, "versions", lambda: env)
    monkeypatch.setenv("GPU_WORK", str(tmp_path / "work"))
    assert gpu.main([str(tmp_path / "out")]) == gpu.EXIT_PARTIAL
    doc = json.loads((tmp_path / "out" / "gpu.json").read_text())
    status = {r["config"]: r["status"] for r in doc["configs"]}
    assert [k for k, v in status.items() if v == "ok"] == ["sr zero2", "mae zero2", "sr ddp"]
    assert doc["skipped"] == [c.label for c in gpu.CONFIGS[3:]]
    assert all(doc["checks"].values()) and doc["exit"] == gpu.EXIT_PARTIAL and not doc["ok"]
    first = doc["configs"][0]
    assert first["images_per_s"] == 9.0 and first["timed_steps"] == 30
    assert first["mfu"] == pytest.approx(gpu.mfu(1e9, 9.0, 989.4))
    assert "skipped (budget)" in (tmp_path / "out" / "gpu.md").read_text()

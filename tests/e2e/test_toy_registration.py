"""A new architecture and a new task, each defined and registered in this file alone, go through
every command in-process: dry run, training with checkpoints, an exact resume, stage chaining
with freezing and param groups by name, evaluation and the report. Nothing under toolkit/ knows
them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tests.helpers import make_pairs, read_jsonl
from toolkit import evaluate, launch, report
from toolkit.core.metrics import image_metrics
from toolkit.core.seen import Seen, Truth
from toolkit.data.sharding import shard
from toolkit.models import MODELS, ModelSpec, register_model
from toolkit.runs.recipe import ModelBase, setting
from toolkit.tasks import TASKS, BatchResult, Placement, Task

pytestmark = pytest.mark.slow

SIGMA = 0.1


@dataclass
class ToyConfig(ModelBase):
    # Channels of the hidden layer.
    width: int = setting(4, gt=0)


class Toy(nn.Module):
    """Two convolutions and a skip: x + conv2(relu(conv1(x)))."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.in_chans, cfg.width, 3, padding=1)
        self.conv2 = nn.Conv2d(cfg.width, cfg.in_chans, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x).relu())


class Denoise(Task):
    """Remove Gaussian noise (sigma 0.1) from HR images; the noisy input is the reference."""

    name = "toy_denoise"
    title = "denoising"
    default_arch = "toy"
    fields = ("hr",)
    metrics = ("loss", "mse", "psnr")
    table = ("mse", "psnr")
    compare = ("psnr",)
    score = "psnr"
    reference = "noisy"
    tiles = ("noisy", "denoised", "HR")
    scored_tiles = ("noisy", "denoised")

    def noisy(self, batch: dict[str, Any], rng: torch.Generator | None) -> Tensor:
        hr = batch["hr"]
        if rng is None:  # evaluation: the noise of each sample follows from its key
            seeds = [int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) for k in batch["key"]]
            noise = torch.stack([torch.randn(hr.shape[1:], generator=torch.Generator()
                                             .manual_seed(s)) for s in seeds])  # fmt: skip
        else:
            noise = torch.randn(hr.shape, generator=rng)
        return hr + SIGMA * noise

    def losses(self, model, batch, at: Placement, rng):  # type: ignore[no-untyped-def]
        noisy = self.noisy(batch, rng).to(at.device)
        out = model(noisy)
        return F.mse_loss(out, batch["hr"].to(at.device), reduction="none").mean((1, 2, 3)), out

    def evaluate(self, model, batch, at: Placement, tiles: int) -> BatchResult:  # type: ignore[no-untyped-def]
        loss, out = self.losses(model, batch, at, None)
        noisy, hr = self.noisy(batch, None), batch["hr"]
        rows = [list(t) for t in zip(noisy[:tiles], out[:tiles].clamp(0, 1), hr[:tiles],
                                     strict=True)]  # fmt: skip
        truth = Truth(hr)
        ours = image_metrics(self.metrics, Seen(out.clamp(0, 1), truth))
        theirs = image_metrics(self.metrics, Seen(noisy.clamp(0, 1), truth))
        return BatchResult({"loss": loss, **ours}, theirs, rows)


TOY = ModelSpec("toy", ToyConfig, Toy, tasks=("toy_denoise",), title="Toy")


def register() -> None:
    register_model(TOY)
    TASKS.register("toy_denoise", Denoise)


# Registered when the file is imported, as a user's plug-in module would: that alone gives the
# pair the basics of tests/e2e/test_registered.py. The collection then forgets it (other tests
# see only the built-ins), and the fixture registers it again for this file's test.
register()


@pytest.fixture
def registered():
    register()
    yield
    MODELS.unregister("toy")
    TASKS.unregister("toy_denoise")


RECIPE = """name: toy
task: toy_denoise
data: {{shards: {shards}, batch_size: 4, num_workers: 0, shuffle_buffer: 8}}
model: {{arch: toy, img_size: 16, width: 4}}
optim: {{lr: 1.0e-2, scheduler: {{name: constant}}}}
train: {{max_steps: 6, checkpoint_every: 2, precision: 'no', log_every: 1}}
cluster: {{gpus_per_node: 0, partition: null}}
"""


def test_a_registered_toy_model_and_task_go_through_every_command(
    registered, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    make_pairs(tmp_path / "src", 24, size=16)
    shard(tmp_path / "src", tmp_path / "shards", val_fraction=0.25, shard_size=8)
    path = tmp_path / "toy.yaml"
    path.write_text(RECIPE.format(shards=tmp_path / "shards"))
    straight, resumed, chained = tmp_path / "straight", tmp_path / "resumed", tmp_path / "chained"

    assert launch.main([str(path), "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"]["total"] == (9 * 4 + 4) + (9 * 4 + 1)  # conv1 1->4, conv2 4->1, 3x3
    assert doc["recipe"]["model"] == {"arch": "toy", "in_chans": 1, "img_size": 16, "width": 4}

    # training, and a run stopped at step 4 and relaunched: the same weights, bit for bit
    assert launch.main([str(path), "--local", f"run.dir={straight}"]) == 0
    assert launch.main([str(path), "--local", f"run.dir={resumed}", "train.max_steps=4"]) == 0
    caplog.set_level("INFO")
    assert launch.main([str(path), "--local", f"run.dir={resumed}"]) == 0
    assert "resumed from" in caplog.text and "step-00000004" in caplog.text
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [x["step"] for x in read_jsonl(resumed / "metrics.jsonl") if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]

    ev = json.loads((straight / "eval.json").read_text())
    assert (ev["task"], ev["reference"], set(ev["model"])) == ("toy_denoise", "noisy",
                                                               {"loss", "mse", "psnr"})  # fmt: skip
    assert ev["model"]["psnr"] > ev["noisy"]["psnr"]  # it learned to denoise

    # stage chaining by parameter name: conv1 frozen at the first run's values, conv2 trains
    # in its own param group
    chain = [f"run.dir={chained}", f"init.from={straight}", "freeze=[conv1]",
             "optim.groups=[{match: conv2, lr: 1.0e-3}]"]  # fmt: skip
    assert launch.main([str(path), "--local", *chain]) == 0
    c = load_file(chained / "model.safetensors")
    assert torch.equal(c["conv1.weight"], a["conv1.weight"])
    assert not torch.equal(c["conv2.weight"], a["conv2.weight"])
    lrs = {k for x in read_jsonl(chained / "metrics.jsonl") for k in x if k.startswith("train/lr")}
    assert lrs == {"train/lr/optim.groups[0] 'conv2'"}

    capsys.readouterr()
    assert evaluate.main([str(straight), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["model"] == pytest.approx(ev["model"]) and again["noisy"] == ev["noisy"]

    out = tmp_path / "report"
    assert report.main([str(straight), str(chained), "--out", str(out)]) == 0
    (table,) = json.loads((out / "results.json").read_text())["tables"]
    assert [r["mode"] for r in table["rows"]] == ["Toy", "Toy, frozen conv1", "noisy"]
    assert table["columns"] == ["mse", "psnr"] and table["best"]["psnr"] == max(
        r["psnr"] for r in table["rows"]
    )
    for name in ("compare.png", "samples_straight.png", "loss_chained.png"):
        assert (out / name).stat().st_size > 1000, name

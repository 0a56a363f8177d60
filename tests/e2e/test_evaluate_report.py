"""Evaluation and reports on real runs: eval.json, 1 vs 2 processes, the table and figures,
RGB photos end to end, and the bad inputs that must be one line with exit status 2."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import (
    DEBUG_RECIPE,
    evaluate_json,
    make_pairs,
    make_shards,
    one_error_line,
    run_cli,
    run_ok,
    tiny,
)
from toolkit.data.format import read_manifest
from toolkit.data.sharding import shard
from toolkit.reporting import tables
from toolkit.runs.directory import load_model, locate
from toolkit.runs.hold import HOLD, held
from toolkit.tasks import TASKS
from toolkit.tasks.sr import PHYSICS

pytestmark = pytest.mark.slow


def one_line_error(module: str, *args: str) -> str:
    """Run a command that must fail on bad input: exit 2, one `error:` line, no traceback."""
    proc = run_cli(module, *args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-4000:]
    return one_error_line(out)


def val_members(shards: Path) -> dict[str, dict[str, bytes]]:
    """{sample key: {"hr.npy": bytes, ...}} of the val split, read from the tars with tarfile:
    not through the loader under test."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((shards / "val").glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def pairs_with_psfs(root: Path, count: int) -> None:
    """make_pairs, and the PSFs of every other pair in meta/<key>.json (as the simulator
    writes them): a validation split with both forward models."""
    make_pairs(root, count)
    (root / "meta").mkdir()
    for i in range(0, count, 2):
        meta = {"hr_pixel": 0.03, "lr_pixel": 0.06, "psf": "gaussian", "hr_psf_fwhm": 0.1,
                "lr_psf_fwhm": 0.2}  # fmt: skip
        (root / "meta" / f"{i:04d}.json").write_text(json.dumps(meta))


def shape_of(doc: object) -> object:
    """A JSON document's keys at every depth (lists as their length), without the values."""
    if isinstance(doc, dict):
        return {k: shape_of(v) for k, v in doc.items() if k != "source"}
    if isinstance(doc, list):
        return len(doc)
    return type(doc).__name__


def mean_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak 1: 10 log10(1 / MSE) of each image [C, H, W] in float64, then their mean (dB)."""
    mse = (out.double() - ref.double()).square().mean(dim=(1, 2, 3))
    return sum(10 * math.log10(1 / m) for m in mse.tolist()) / len(mse)


def bicubic_x2(lr: torch.Tensor) -> torch.Tensor:
    """torch's bicubic (a = -0.75), pixel centres aligned (align_corners=False), clamped to
    [0, 1] as the metrics of unit data are."""
    return F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def grey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(shards, pretrain run, finetune run): 1-channel pairs, a few steps of each stage."""
    root = tmp_path_factory.mktemp("evalrep")
    make_shards(root, 40, images=pairs_with_psfs, val_fraction=0.25, shard_size=8)
    pre, fine = root / "pre", root / "fine"
    run_ok("toolkit.launch", str(DEBUG_RECIPE), "--local",
           *tiny(root / "shards", pre, "train.max_steps=4", task="mae"))  # fmt: skip
    run_ok("toolkit.launch", str(DEBUG_RECIPE), "--local",
           *tiny(root / "shards", fine, "train.max_steps=6", f"init.from={pre}",
                 "freeze=[encoder]", "train.checkpoint_every=3"))  # fmt: skip
    return root / "shards", pre, fine


def test_evaluate_counts_every_sample_once_and_matches_on_two_processes(grey) -> None:
    """eval.json's PSNRs (model and bicubic) are the ones computed here from the val shard's
    files, every sample once, and the same on 2 processes; the train split is evaluated too."""
    shards, _, fine = grey
    one = evaluate_json(str(fine))
    assert json.loads((fine / "eval.json").read_text()) == one
    assert one["split"] == "val" and one["count"] == read_manifest(shards).count("val")
    # PSNR recomputed here from the shard files: the bicubic row from the paired LR, the
    # model's from the exported weights run on the same LR (32x32 HR: the centre crop is whole).
    samples = val_members(shards)
    assert len(samples) == one["count"]
    hr = torch.stack(
        [torch.from_numpy(np.load(io.BytesIO(s["hr.npy"])))[None] for s in samples.values()]
    )
    lr = torch.stack(
        [torch.from_numpy(np.load(io.BytesIO(s["lr.npy"])))[None] for s in samples.values()]
    )
    with torch.no_grad():
        sr = load_model(locate(fine)).eval()(lr).clamp(0, 1)
    # The same float32 inputs through the same torch kernels: only float64 sums in another
    # order differ (1e-14 dB seen), hence 1e-9 dB. The model's may also round its float32 sums
    # differently in batches of another size (0 seen; ~1e-7 relative per pixel at most), hence
    # 1e-6 dB. A PSNR of the mean MSE instead of the mean PSNR is 7e-3 dB off here; other
    # conventions (align_corners=True, bilinear) 1.5 dB and more.
    assert one["bicubic"]["psnr"] == pytest.approx(mean_psnr(bicubic_x2(lr), hr), abs=1e-9)
    assert one["model"]["psnr"] == pytest.approx(mean_psnr(sr, hr), abs=1e-6)
    assert abs(one["model"]["psnr"] - one["bicubic"]["psnr"]) > 1e-2  # two different rows
    stats = one["per_image"]["model"]["psnr"]
    assert len(stats["worst"]) == 5 and stats["worst"][0][1] == min(v for _, v in stats["worst"])
    assert stats["worst"][0][1] <= stats["median"]
    # every sample's values beside it, by key: the val shard's keys, each PSNR the model's
    assert one["samples"] == "eval.samples.npz"
    with np.load(fine / "eval.samples.npz", allow_pickle=False) as kept:
        assert kept["keys"].tolist() == sorted(samples)
        assert kept["model.psnr"].mean() == pytest.approx(one["model"]["psnr"], abs=1e-9)
        assert kept["bicubic.psnr"].mean() == pytest.approx(one["bicubic"]["psnr"], abs=1e-9)
        one_proc = kept["model.psnr"].copy()
    two = evaluate_json(str(fine), "--local", "--procs", "2")
    # the same keys at every depth: every value computed on 1 process is there on 2
    assert shape_of(two) == shape_of(one)
    assert set(one["model"]) == set(TASKS.get("sr").metrics)  # the physics-aware ones too
    for part in ("model", "bicubic"):
        # the same samples; batches of another composition round differently (~1e-8)
        assert two[part] == pytest.approx(one[part], rel=1e-6, abs=1e-12)
    for name in ("hr", "model", "bicubic"):  # the spectra: means over the same samples
        assert two["spectra"][name] == pytest.approx(one["spectra"][name], rel=1e-6, abs=1e-12)
    assert two["spectra"]["frequency"] == one["spectra"]["frequency"]
    physical = sum(int(k) % 2 == 0 for k in samples)  # the pairs with their PSFs
    assert 0 < physical < one["count"]
    assert two["forward_model"] == one["forward_model"]
    assert one["forward_model"] == {"psf": physical, "run": one["count"] - physical}
    assert two["count"] == one["count"]
    with np.load(fine / "eval.samples.npz", allow_pickle=False) as kept:  # 2 processes: by key
        assert kept["model.psnr"] == pytest.approx(one_proc, rel=1e-6)
    # the train split, read once each, centre-cropped: every sample counted once there too
    train = evaluate_json(str(fine), "--split", "train")
    assert train["count"] == read_manifest(shards).count("train")
    # ... written beside the run's own result, which stays the validation one
    assert json.loads((fine / "eval-train.json").read_text()) == train
    assert train["samples"] == "eval-train.samples.npz"  # each evaluation its own samples
    with np.load(fine / "eval-train.samples.npz", allow_pickle=False) as kept:
        assert len(kept["keys"]) == train["count"]
    assert json.loads((fine / "eval.json").read_text())["split"] == "val"


def test_evaluate_a_checkpoint_and_a_weights_file(grey, monkeypatch) -> None:
    _, _, fine = grey
    run = evaluate_json(str(fine))
    ckpt = evaluate_json(str(fine / "checkpoints" / "step-00000006"))
    weights = evaluate_json(str(fine / "model.safetensors"))
    assert ckpt["model"] == run["model"] == weights["model"]
    # a relative path from inside the checkpoints folder still finds the run
    monkeypatch.chdir(fine / "checkpoints")
    earlier = evaluate_json("step-00000003")
    assert earlier["model"] != run["model"]  # an earlier checkpoint is another model
    # each checkpoint's evaluation has a file of its own; the run's eval.json is its final one
    assert json.loads((fine / "eval-step-00000003.json").read_text()) == earlier
    assert json.loads((fine / "eval-step-00000006.json").read_text()) == ckpt
    assert json.loads((fine / "eval.json").read_text())["model"] == run["model"]


def test_report_table_equals_eval_json_and_figures_are_real(grey, tmp_path) -> None:
    _, pre, fine = grey
    out = tmp_path / "rep"
    run_ok("toolkit.report", str(pre), str(fine), "--out", str(out))
    doc = json.loads((out / "results.json").read_text())
    ev = json.loads((fine / "eval.json").read_text())
    mae, sr = doc["tables"]
    assert [r["run"] for r in mae["rows"]] == ["pre"] and mae["columns"] == ["loss"]
    assert mae["rows"][0]["loss"] == json.loads((pre / "eval.json").read_text())["model"]["loss"]
    row = next(r for r in sr["rows"] if r["run"] == "fine")
    assert row["mode"] == "SR-MAE, frozen encoder" and row["init_from"] == str(pre)
    columns = TASKS.get("sr").table  # what the SR task's table shows
    assert sr["columns"] == list(columns)
    assert all(row[k] == ev["model"][k] for k in columns)
    bicubic = next(r for r in sr["rows"] if r["mode"] == "bicubic")
    assert all(bicubic[k] == ev["bicubic"][k] for k in columns)
    for r in (row, bicubic, mae["rows"][0]):  # an interval about each value, from the samples
        for k in columns if r is not mae["rows"][0] else TASKS.get("mae").table:
            low, high = r[f"{k}_ci"]
            assert low < r[k] < high, (r["mode"], k)
    (pair,) = sr["pairs"]  # the one run against bicubic, on the same 10 images
    assert (pair["a"], pair["b"], pair["count"]) == ("SR-MAE, frozen encoder (`fine`)",
                                                     "bicubic", ev["count"])  # fmt: skip
    assert pair["psnr"]["diff"] == pytest.approx(ev["model"]["psnr"] - ev["bicubic"]["psnr"])
    (physics,) = sr["more"]  # the physics-aware table: the run and bicubic, with intervals
    assert physics["columns"] == list(PHYSICS)
    assert [r["mode"] for r in physics["rows"]] == ["SR-MAE, frozen encoder", "bicubic"]
    for r, part in zip(physics["rows"], ("model", "bicubic"), strict=True):
        for k in PHYSICS:
            assert r[k] == ev[part][k]
            low, high = r[f"{k}_ci"]
            assert low <= r[k] <= high, (r["mode"], k)
    md = (out / "results.md").read_text()
    best = sr["best"]["psnr"]
    bold = len(sr["best"]) + len(mae["best"]) + 1  # + the physics table's title
    bold += sum(1 for k in PHYSICS for r in physics["rows"] if r[k] == physics["best"][k])
    assert f"**{best:.2f}** [" in md and md.count("**") == 2 * bold
    assert "**super-resolution: physics** (" in md and "| LR consistency PSNR (dB) |" in md
    assert "| SR-MAE, frozen encoder (`fine`) - bicubic | " in md
    sizes = {
        "loss_fine.png": (1000, 500),
        "loss_pre.png": (1000, 500),
        "samples_fine.png": (5 * 240, 4 * 240),  # LR | bicubic | SR | HR | error, 4 samples
        "samples_pre.png": (4 * 240, 4 * 240),  # masked | reconstruction | HR | error
        "compare.png": (1000, 450),
        "spectra.png": (1100, 450),
    }
    for name, size in sizes.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
            pixels = np.asarray(im.convert("L"), dtype=np.float64)
        assert pixels.std() > 10, f"{name} looks blank"


def test_rgb_photos_end_to_end(tmp_path) -> None:
    """Public-domain photos that ship with scikit-image, 3 channels all the way through."""
    data = pytest.importorskip("skimage.data")
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photo = getattr(data, name)()  # [H, W, 3] uint8
        h, w = photo.shape[0] // 64 * 64, photo.shape[1] // 64 * 64
        for i in range(0, h, 64):  # 64x64 tiles: enough samples for both splits
            for j in range(0, w, 64):
                Image.fromarray(photo[i : i + 64, j : j + 64]).save(src / f"{name}-{i}-{j}.png")
    shards, run = tmp_path / "shards", tmp_path / "run"
    run_ok("toolkit.shard", str(src), str(shards), "--val-fraction", "0.1", "--shard-size", "64")
    assert tuple(read_manifest(shards).channels) == (3,)
    run_ok("toolkit.launch", str(DEBUG_RECIPE), "--local",
           *tiny(shards, run, "train.max_steps=4", "model.in_chans=3"))  # fmt: skip
    ev = evaluate_json(str(run))
    assert ev["count"] == read_manifest(shards).count("val")
    # The bicubic row recomputed from the PNG files in the val shards: 8-bit / 255, the 32x32
    # centre crop of each 64x64 tile (the model's img_size), LR = torch's antialiased bicubic
    # downscale clamped to [0, 1] (HR-only shards), then bicubic x2 back, clamped.
    hr = torch.stack([
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["hr.png"])), np.float32) / 255)
        .permute(2, 0, 1)[:, 16:48, 16:48]
        for s in val_members(shards).values()
    ])  # fmt: skip
    assert hr.shape[1:] == (3, 32, 32) and len(hr) == ev["count"]
    lr = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    # float32 through the same kernels, float64 sums in another order (1e-14 dB seen): 1e-9 dB.
    # An LR not clamped moves it by 3e-3 dB, one not antialiased by 0.2 dB.
    assert ev["bicubic"]["psnr"] == pytest.approx(mean_psnr(bicubic_x2(lr), hr), abs=1e-9)
    out = tmp_path / "rep"
    run_ok("toolkit.report", str(run), "--out", str(out))
    with Image.open(out / "samples_run.png") as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    colour = np.abs(rgb[..., 0] - rgb[..., 2]).mean()
    assert colour > 1, "the sample map shows no colour: channels were lost"


def test_bad_inputs_are_one_line_with_exit_status_2(grey, tmp_path) -> None:
    shards, _, fine = grey
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(fine / "recipe.yaml", empty / "recipe.yaml")
    line = one_line_error("toolkit.evaluate", str(empty))
    assert str(empty) in line and "no weights found" in line
    # weights of another width: the run's model read with a wider embedding
    line = one_line_error("toolkit.evaluate", str(fine), "model.embed_dim=48")
    assert str(fine) in line and "32" in line and "48" in line and "model expects" in line
    # shards of another channel count than the model
    rgb = tmp_path / "rgb"
    (rgb / "src").mkdir(parents=True)
    for i in range(6):
        arr = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(rgb / "src" / f"{i}.png")
    shard(rgb / "src", rgb / "shards", val_fraction=0.5)
    line = one_line_error("toolkit.evaluate", str(fine), "--shards", str(rgb / "shards"))
    assert "manifest.json" in line and "3-channel" in line and "model.in_chans is 1" in line
    # eval.json of the run is untouched by the failures
    assert json.loads((fine / "eval.json").read_text())["count"] == read_manifest(shards).count(
        "val"
    )
    line = one_line_error("toolkit.report", str(empty), "--out", str(tmp_path / "r"))
    assert "eval.json" in line and "toolkit.evaluate" in line
    assert not (tmp_path / "r").exists()
    line = one_line_error("toolkit.evaluate", str(tmp_path / "nowhere"))
    assert "no such run directory" in line
    # no abbreviated flags: `--loc --proc 2` must not be read as --local --procs 2
    line = one_line_error("toolkit.evaluate", str(fine), "--loc", "--proc", "2")
    assert "unrecognized arguments" in line


def test_evaluate_does_not_write_into_a_run_another_process_writes(grey) -> None:
    """The run directory has one writer: an evaluation waits its turn, on 1 or 2 processes."""
    _, _, fine = grey
    before = (fine / "eval.json").read_text()
    with held(fine, "training debug"):
        for procs in ([], ["--local", "--procs", "2"]):
            line = one_line_error("toolkit.evaluate", str(fine), *procs)
            assert f"{fine}: in use by training debug (pid {os.getpid()} on " in line
    assert (fine / "eval.json").read_text() == before
    assert not (fine / HOLD).exists()


def test_report_of_a_run_reads_its_loss_curve(grey) -> None:
    shards, _, fine = grey
    run = tables.read_run(fine)
    per_epoch = -(-read_manifest(shards).count("train") // 4)  # batches of 4
    assert run.mode == "SR-MAE, frozen encoder" and run.epochs == pytest.approx(6 / per_epoch)
    assert [m["step"] for m in run.metrics if "train/loss" in m][-1] == 6


def test_report_without_the_shards_still_writes_the_table_and_curves(grey, tmp_path) -> None:
    """Sample maps need the shards and weights; when they are gone the rest of the report
    stands, and the log says which map is missing."""
    _, _, fine = grey
    moved = tmp_path / "moved"
    shutil.copytree(fine, moved)
    text = (moved / "recipe.yaml").read_text()
    (moved / "recipe.yaml").write_text(
        "\n".join(
            f"  shards: {tmp_path / 'gone'}" if line.startswith("  shards:") else line
            for line in text.splitlines()
        )
    )
    out = tmp_path / "rep"
    log = run_ok("toolkit.report", str(moved), "--out", str(out))
    assert "no sample map for moved" in log
    assert (out / "results.md").is_file() and (out / "loss_moved.png").is_file()
    assert not (out / "samples_moved.png").exists()

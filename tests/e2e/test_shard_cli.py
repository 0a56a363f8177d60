"""The shard CLI: one-line user errors with exit 2 (in-process, subprocess); killed runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, cli, cli_env, run_main
from toolkit import shard
from toolkit.data import sharding


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    return run_main(capsys, shard.main, *argv)


def make_pairs(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        for side, size in (("hr", 8), ("lr", 4)):
            (root / side).mkdir(parents=True, exist_ok=True)
            np.save(root / side / f"s{i:03d}.npy", rng.random((size, size)).astype(np.float32))
    return root


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_shard_cli_writes_manifest(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 10)
    code, out, _ = run(capsys, src, tmp_path / "out", "--val-fraction", "0.2", "--seed", "4")
    assert code == 0 and out == ""
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seed"] == 4 and manifest["val_fraction"] == 0.2
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 10


def test_empty_source_is_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no data")
    code, _, err = run(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 2
    assert "no usable files" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_lr_without_hr_is_one_line(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 3)
    np.save(src / "lr" / "extra.npy", np.zeros((4, 4)))
    code, _, err = run(capsys, src, tmp_path / "out")
    assert code == 2
    assert "lr/extra.npy has no hr partner" in one_error_line(err)


def test_meta_without_a_pair_is_one_line(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 3)
    (src / "meta").mkdir()
    (src / "meta" / "s001.json").write_text("{}")
    (src / "meta" / "extra.json").write_text("{}")
    code, _, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert f"{src / 'meta' / 'extra.json'} describes no pair" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_strict_bad_meta_is_one_line_and_writes_nothing(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 4)
    (src / "meta").mkdir()
    (src / "meta" / "s002.json").write_text("[]")
    code, _, err = run(capsys, src, tmp_path / "out", "--strict")
    assert code == 2 and "Traceback" not in err
    assert "meta/s002.json: a JSON list, not an object" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, err = run(capsys, src, tmp_path / "out")
    assert code == 2
    line = one_error_line(err)
    assert str(tmp_path / "out") in line and "--overwrite" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    code, _, _ = run(capsys, src, tmp_path / "out", "--overwrite")
    assert code == 0 and (tmp_path / "out" / "manifest.json").is_file()


def test_strict_corrupt_file_is_one_line_and_writes_nothing(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 6)
    (src / "lr" / "s002.npy").write_bytes(b"\x93NUMPY")
    code, _, err = run(capsys, src, tmp_path / "out", "--strict", "--workers", "2")
    assert code == 2
    assert "lr/s002.npy" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    code, _, _ = run(capsys, src, tmp_path / "out")  # without --strict: skipped and listed
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["path"] for e in manifest["skipped"]] == ["lr/s002.npy"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--val-fraction", "1"], "--val-fraction"),
        (["--shard-size", "0"], "--shard-size"),
        (["--workers", "0"], "--workers"),
        (["--workers", "two"], "invalid int"),
        (["--nope"], "unrecognized"),
    ],
)
def test_bad_flags_are_one_line(capsys, tmp_path: Path, flags: list[str], words: str) -> None:
    src = make_pairs(tmp_path / "src", 2)
    code, _, err = run(capsys, src, tmp_path / "out", *flags)
    assert code == 2
    assert words in one_error_line(err)


def test_subprocess_exit_status(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    done = cli("toolkit.shard", str(tmp_path / "empty"), out, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    done = cli("toolkit.shard", str(make_pairs(tmp_path / "src", 4)), out, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- interrupted runs


def assert_consistent(out: Path) -> dict | None:
    """If OUT has a manifest, every shard it names is there, whole: size and sha256 match."""
    path = out / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        for s in split["shards"]:
            data = (out / s["name"]).read_bytes()
            assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    return manifest


def kill_when(cmd: list[str], ready: Callable[[], bool]) -> int | None:
    """Run cmd; SIGKILL it (and its workers) as soon as ready(). Its exit status: -SIGKILL
    where the kill landed, another where it had exited first, None where ready() never came
    true before it ended (or in 60 s)."""
    proc = subprocess.Popen(
        cmd, env=cli_env(), cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    fired = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                fired = True
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and not fired:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode if fired else None


# `python -m toolkit.shard` paused for good at one point of its commit, for the kill to land
# there and nowhere else: after the K-th shard is renamed to its name (point "shard:K"), or
# after manifest.json is written (point "manifest"). The commit's own code runs unchanged;
# os.replace, which performs each of those steps, only stops after doing it.
PAUSED_SHARD = """
import os, sys, time
from pathlib import Path

marker, point = Path(sys.argv[1]), sys.argv[2]
real, renamed = os.replace, 0

def replace(src, dst, *args, **kwargs):
    global renamed
    real(src, dst, *args, **kwargs)
    name = Path(dst).name
    if name.startswith("shard-") and name.endswith(".tar"):
        renamed += 1
    shard_hit = name.startswith("shard-") and point == f"shard:{renamed}"
    if shard_hit or (point == "manifest" and name == "manifest.json"):
        marker.with_suffix(".tmp").write_text(str(dst))
        real(marker.with_suffix(".tmp"), marker)  # whole when it appears
        time.sleep(600)

os.replace = replace
from toolkit import shard
from toolkit.data import sharding
sys.exit(shard.main(sys.argv[3:]))
"""


def paused_at(point: str, marker: Path, *argv: str | Path) -> list[str]:
    return [sys.executable, "-c", PAUSED_SHARD, str(marker), point, *map(str, argv)]


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("many")
    a = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    for i in range(3000):
        np.save(src / f"s{i:04d}.npy", a)
    return src


def temps(out: Path) -> bool:
    return any(out.glob("*/.shard-*.tmp-*"))


def names(manifest: dict) -> list[str]:
    return sorted(s["name"] for sp in manifest["splits"].values() for s in sp["shards"])


def named_tars(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("*/shard-*.tar"))


def cleaned_up_by_a_rerun(src: Path, out: Path) -> None:
    """A later --overwrite leaves exactly the files its manifest names, shards and their
    indexes (no temporaries, no stale shards of the killed runs)."""
    new = sharding.shard(src, out, shard_size=1000, overwrite=True)
    named = {out / s[k] for sp in new["splits"].values() for s in sp["shards"]
             for k in ("name", "index")}  # fmt: skip
    assert {p for p in out.glob("*/*") if p.is_file()} | set(out.glob("*/.*")) == named


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_killed_while_writing_leaves_no_manifest(many_files: Path, tmp_path: Path, workers) -> None:
    """Killed while the shards are being written (a temporary tar exists; the commit needs all
    100 written): no manifest and no shard under its name. That the process died of the
    SIGKILL, and that its temporaries are still there, says the kill landed while writing:
    a commit, had it begun, would have renamed them."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "toolkit.shard", str(many_files), str(out), "--shard-size", "30"]
    assert kill_when([*cmd, "--workers", workers], lambda: temps(out)) == -signal.SIGKILL
    assert temps(out)  # where it landed: mid-write
    assert not (out / "manifest.json").exists()
    assert named_tars(out) == []  # nothing is renamed before every shard is whole
    cleaned_up_by_a_rerun(many_files, out)


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_killed_in_the_commit_before_the_manifest_leaves_none(
    many_files: Path, tmp_path: Path, overwrite: bool
) -> None:
    """Killed after the first shard got its name and before the manifest is written: OUT has
    no manifest at all, so no reader sees a mix of shards; over an old run, its manifest was
    removed before the first of its shards was replaced, so the old run is not shown either."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    old = sharding.shard(many_files, out, shard_size=500, seed=1) if overwrite else None
    cmd = paused_at("shard:1", marker, many_files, out, "--shard-size", "30", "--overwrite")
    assert kill_when(cmd, marker.exists) == -signal.SIGKILL
    assert marker.read_text() == str(out / "train/shard-000000.tar")  # where it landed
    assert not (out / "manifest.json").exists()
    assert temps(out)  # the other new shards, not yet renamed
    # Fresh: the one renamed shard. Over an old run: its files, one of them now replaced by a
    # new shard, unnamed by any manifest.
    assert named_tars(out) == (names(old) if old else ["train/shard-000000.tar"])
    cleaned_up_by_a_rerun(many_files, out)


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_killed_after_the_manifest_shows_the_new_run_whole(
    many_files: Path, tmp_path: Path, overwrite: bool
) -> None:
    """Killed after the manifest is written, before an old run's extra shards are deleted:
    the manifest is the new run's, every shard it names is whole (size, sha256), and the stale
    shards left behind are named by none of it."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    old = sharding.shard(many_files, out, shard_size=200, seed=1) if overwrite else None
    cmd = paused_at("manifest", marker, many_files, out, "--shard-size", "500", "--overwrite")
    assert kill_when(cmd, marker.exists) == -signal.SIGKILL
    assert marker.read_text() == str(out / "manifest.json")  # where it landed
    manifest = assert_consistent(out)
    assert manifest is not None and manifest["shard_size"] == 500
    assert not temps(out)  # every new shard renamed
    stale = sorted(set(named_tars(out)) - set(names(manifest)))
    # The old run's shards of 200 outnumber the new ones of 500: the extra ones are still there.
    assert stale == (sorted(set(names(old)) - set(names(manifest))) if old else [])
    assert stale or not overwrite
    cleaned_up_by_a_rerun(many_files, out)


@pytest.mark.slow
def test_killed_overwrite_while_writing_keeps_the_old_run(many_files: Path, tmp_path: Path) -> None:
    """--overwrite killed while its shards are being written leaves the old run as it was:
    its manifest and every shard it names, byte for byte."""
    out = tmp_path / "out"
    old = sharding.shard(many_files, out, shard_size=500, seed=1)
    cmd = [sys.executable, "-m", "toolkit.shard", str(many_files), str(out), "--overwrite"]
    assert kill_when([*cmd, "--shard-size", "30", "--workers", "2"], lambda: temps(out)) == (
        -signal.SIGKILL
    )
    assert temps(out)  # where it landed: mid-write, nothing renamed yet
    assert assert_consistent(out) == old
    cleaned_up_by_a_rerun(many_files, out)


def test_verify_checks_every_shard_against_its_manifest(capsys, caplog, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 12)
    out = tmp_path / "out"
    assert run(capsys, src, out, "--shard-size", "4")[0] == 0
    caplog.set_level("INFO")
    assert run(capsys, "--verify", out)[0] == 0
    assert "shards match their manifest entries (size and sha256)" in caplog.text
    shard_file = sorted((out / "train").glob("shard-*.tar"))[0]
    data = bytearray(shard_file.read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside a member: same size, another sha256
    shard_file.write_bytes(bytes(data))
    code, _, err = run(capsys, "--verify", out)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(line) == 1 and str(shard_file) in line[0] and "sha256" in line[0]
    assert "1 of" in line[0]
    assert run(capsys, "--verify", out, src)[0] == 2  # --verify takes no SRC/OUT


def make_bands(root: Path, n: int, bands: int = 5, size: int = 16) -> dict[str, np.ndarray]:
    """Paired multi-band float32 stacks with negative values (sky-subtracted) and a large
    dynamic range; HR (bands, size, size) channels first, LR channels last."""
    rng = np.random.default_rng(7)
    out = {}
    for side in ("hr", "lr"):
        (root / side).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hr = (rng.standard_normal((bands, size, size)) * 3.0).astype(np.float32)
        hr[:, size // 2, size // 2] = 1e4  # a bright point source
        lr = hr.reshape(bands, size // 2, 2, size // 2, 2).mean(axis=(2, 4))
        np.save(root / "hr" / f"s{i:03d}.npy", hr)
        np.save(root / "lr" / f"s{i:03d}.npy", lr.transpose(1, 2, 0).copy())
        out[f"s{i:03d}"] = hr
    return out


def test_multi_band_floats_shard_and_load_back_bit_identical(capsys, tmp_path: Path) -> None:
    from toolkit.data.loader import build_loader
    from toolkit.runs.recipe import DataConfig

    hr = make_bands(tmp_path / "src", 12)
    code, _, _ = run(capsys, tmp_path / "src", tmp_path / "out", "--val-fraction", "0.5")
    assert code == 0
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert doc["channels"] == [5]
    every = np.stack(list(hr.values()))
    low = min(float(every.min()), float(np.load(tmp_path / "src/lr/s000.npy").min()))
    assert doc["value_range"][0] <= low < 0 and doc["value_range"][1] == 1e4
    data = DataConfig(shards=str(tmp_path / "out"), batch_size=3, num_workers=0)
    seen = 0
    for split in ("train", "val"):
        loader = build_loader(data, split, crop=16, seed=0, fields=("hr", "lr"), evaluation=True)
        for batch in loader:
            for key, got, got_lr in zip(batch["key"], batch["hr"], batch["lr"], strict=True):
                assert torch.equal(got, torch.from_numpy(hr[key]))
                lr = np.load(tmp_path / "src" / "lr" / f"{key}.npy").transpose(2, 0, 1)
                assert torch.equal(got_lr, torch.from_numpy(np.ascontiguousarray(lr)))
                seen += 1
        loader.close()
    assert seen == 12


def test_nan_pixels_are_refused_or_filled_and_counted(capsys, tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 6)
    masked = np.load(src / "hr" / "s002.npy")
    masked[0, :3] = np.nan
    masked[1, 0] = np.inf
    np.save(src / "hr" / "s002.npy", masked)
    code, _, err = run(capsys, src, tmp_path / "out", "--strict")
    assert code == 2
    line = one_error_line(err)
    assert "hr/s002.npy" in line and "4 NaN/inf pixels" in line and "--nonfinite zero" in line
    assert not (tmp_path / "out").exists()
    code, _, _ = run(capsys, src, tmp_path / "out")  # refused: skipped and listed, like damage
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert code == 0 and [e["path"] for e in doc["skipped"]] == ["hr/s002.npy"]
    assert doc["nonfinite"] == {"policy": "refuse", "filled": {}}
    code, _, _ = run(capsys, src, tmp_path / "filled", "--nonfinite", "zero")
    doc = json.loads((tmp_path / "filled" / "manifest.json").read_text())
    assert code == 0 and doc["skipped"] == []
    assert doc["nonfinite"] == {"policy": "zero", "filled": {"hr/s002.npy": 4}}
    members = {}
    for tar_path in (tmp_path / "filled").glob("*/*.tar"):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    stored = np.load(io.BytesIO(members["s002.hr.npy"]))
    want = np.where(np.isfinite(masked), masked, 0).astype(np.float32)
    np.testing.assert_array_equal(stored, want[None])  # stored as the [C, H, W] it decodes to
    other = np.load(src / "hr" / "s003.npy")  # a file without NaN is stored as it was
    assert members["s003.hr.npy"] == (src / "hr" / "s003.npy").read_bytes()
    assert other.dtype == np.float32

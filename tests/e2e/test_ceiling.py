"""benchmarks/ceiling.py on a few simulated systems: every SR metric of the noiseless HR, a row
each, in its JSON; the PSNRs finite and the flux errors those of a near-perfect output."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import run_ok
from toolkit.data.sharding import shard
from toolkit.data.sim.write import generate
from toolkit.tasks.sr import PHYSICS

pytestmark = pytest.mark.slow


def test_the_ceiling_scores_the_noiseless_hr_with_every_sr_metric(tmp_path) -> None:
    pytest.importorskip("lenstronomy")
    generate(tmp_path / "raw", 6, seed=3)
    shard(tmp_path / "raw", tmp_path / "shards", val_fraction=0.5, seed=0)
    out = tmp_path / "ceiling.json"
    run_ok("benchmarks.ceiling", str(tmp_path / "shards"), "--seed", "3", "--out", str(out))
    doc = json.loads(out.read_text())
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert doc["count"] == manifest["splits"]["val"]["count"] > 0
    rows = {row["metric"]: row["noiseless HR"] for row in doc["rows"]}
    assert list(rows) == ["mse", "psnr", "ssim", *PHYSICS]
    assert all(math.isfinite(v) for v in rows.values())
    # the noiseless system against its noisy observations: the noise alone (rms 0.004 to 0.008,
    # 42 to 48 dB), and its flux within a percent (a wrong seed renders other systems: far off)
    assert 40 < rows["psnr"] < 50 and 40 < rows["lr_psnr"] < 50
    assert rows["flux_err"] < 0.01 and rows["arc_flux_err"] < 0.01

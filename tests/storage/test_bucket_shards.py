"""Shards in an S3 bucket (moto's server on the loopback interface): sharded into it, verified,
trained from (equal to the same run from local shards, through faults, across a kill), read by
evaluate and predict, and every refusal one line with exit status 2."""

from __future__ import annotations

import http.server
import json
import re
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    DEBUG_RECIPE,
    ROOT,
    cli,
    make_pairs,
    one_error_line,
    read_jsonl,
    run_command,
    tiny,
)
from tests.storage.proxy import FaultProxy
from tests.storage.server import SECRET, S3Server
from toolkit.data.sharding import shard

pytestmark = pytest.mark.slow

SHARD_ARGS = ("--shard-size", "5", "--val-fraction", "0.2", "--seed", "1")
# A tiny SR-MAE: 14 steps of 4 samples over 2 DataLoader workers; checkpoints mid-epoch.
TRAIN = ("train.max_steps=14", "train.checkpoint_every=2", "data.num_workers=2")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("src") / "src", 30)


@pytest.fixture(scope="module")
def local(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shards on local disk: what every bucket run is compared with."""
    out = tmp_path_factory.mktemp("local") / "shards"
    shard(source, out, shard_size=5, val_fraction=0.2, seed=1)
    return out


@pytest.fixture(scope="module")
def local_run(local: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "local"
    done = cli("toolkit.train", str(DEBUG_RECIPE), *tiny(local, run, *TRAIN))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def sharded(s3: S3Server, bucket: str, source: Path) -> str:
    """`shard SRC s3://bucket/set --storage endpoint_url=...` run as a user runs it, the
    endpoint given by the flag alone (not the environment); its URL."""
    url = f"s3://{bucket}/set"
    argv = _python("toolkit.shard", str(source), url, *SHARD_ARGS, "--storage",
                   f"endpoint_url={s3.endpoint}")  # fmt: skip
    done = run_command(*argv, env=_no_endpoint(_env(s3)))
    assert done.returncode == 0, done.stderr[-3000:]
    return url


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _env(s3: S3Server, endpoint: str | None = None) -> dict[str, str]:
    """The test server's credentials and endpoint in the environment, as a user sets them."""
    return {**s3.env(endpoint), "PYTHONPATH": str(ROOT)}


def _no_endpoint(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(run: Path) -> dict[int, float]:
    return {x["step"]: x["train/loss"] for x in read_jsonl(run / "metrics.jsonl")
            if "train/loss" in x}  # fmt: skip


def no_secret(*places: Path | str) -> None:
    for place in places:
        if isinstance(place, str):
            assert SECRET not in place
            continue
        for f in place.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


def test_shards_written_to_a_bucket_are_the_local_ones_and_verify(
    s3_server: S3Server, bucket: str, source: Path, local: Path
) -> None:
    url = sharded(s3_server, bucket, source)
    client = s3_server.client()
    names = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    files = sorted(f"set/{p.relative_to(local).as_posix()}" for p in local.rglob("*")
                   if p.is_file())  # fmt: skip
    assert names == files  # no staging or temporary object left behind
    for name in names:  # sharding is deterministic: the uploads are the local bytes
        body = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        if name.endswith("manifest.json"):  # the source path is the staging folder's
            mine = json.loads((local / "manifest.json").read_text())
            theirs = json.loads(body)
            assert {k: v for k, v in theirs.items() if k != "source"} == {
                k: v for k, v in mine.items() if k != "source"
            }
        else:
            assert body == (local / name.removeprefix("set/")).read_bytes(), name
    done = run_command(*_python("toolkit.shard", "--verify", url), env=_env(s3_server))
    assert done.returncode == 0, done.stderr
    assert "5 shards match" in done.stderr or "shards match" in done.stderr
    # Without --overwrite a bucket prefix holding shards is refused, and left as it was.
    again = run_command(*_python("toolkit.shard", str(source), url, *SHARD_ARGS),
                        env=_env(s3_server))  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in one_error_line(again.stderr)


def test_a_run_from_the_bucket_equals_the_run_from_local_shards(
    s3_server: S3Server, bucket: str, source: Path, local_run: Path, tmp_path: Path
) -> None:
    """Through `launch --local`, as a user types it, the endpoint in the recipe's
    data.storage_options; tensor for tensor, loss for loss."""
    url = sharded(s3_server, bucket, source)
    run = tmp_path / "bucket"
    where = f"data.storage_options.endpoint_url={s3_server.endpoint}"
    done = run_command(
        *_python("toolkit.launch", str(DEBUG_RECIPE), "--local", *tiny(url, run, *TRAIN), where),
        env=_no_endpoint(_env(s3_server)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(run, local_run)
    assert losses(run) == losses(local_run) and len(losses(run)) == 14
    assert json.loads((run / "data.json").read_text())["shards"] == url
    no_secret(run, done.stdout, done.stderr)


def test_a_subset_of_the_bucket_trains_like_the_same_subset_of_local_shards(
    s3_server: S3Server, bucket: str, source: Path, local: Path, tmp_path: Path
) -> None:
    """data.limit lists the bucket's sample keys (each shard streamed from its start) and
    chooses the same 12 samples as from local disk."""
    url = sharded(s3_server, bucket, source)
    runs = []
    for shards, name in ((str(local), "local"), (url, "bucket")):
        run = tmp_path / name
        done = run_command(*_python("toolkit.train", str(DEBUG_RECIPE),
                                    *tiny(shards, run, *TRAIN, "data.limit=12")),
                           env=_env(s3_server))  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(run)
    keys = [json.loads((r / "subset.json").read_text())["keys"] for r in runs]
    assert keys[0] == keys[1] and len(keys[0]) == 12
    assert same_weights(*runs) and losses(runs[0]) == losses(runs[1])


def test_faults_on_the_network_leave_the_weights_of_a_clean_run(
    s3_server: S3Server, bucket: str, source: Path, local_run: Path, tmp_path: Path
) -> None:
    """Every 4th GET a 503, every response cut after 8000 body bytes (a shard is ~25 kB; a
    listing or the manifest, which cannot be resumed from a byte, is less), each
    delayed: the same weights, and each retry logged once (as many as the proxy's faults)."""
    url = sharded(s3_server, bucket, source)
    with FaultProxy(s3_server.endpoint, drop_after=8000, fail_every=4, delay=0.005) as proxy:
        run = tmp_path / "faulty"
        done = run_command(
            *_python("toolkit.train", str(DEBUG_RECIPE), *tiny(url, run, *TRAIN)),
            env=_env(s3_server, proxy.endpoint),
        )
        faults = proxy.failed + proxy.dropped
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(run, local_run)
    assert losses(run) == losses(local_run)
    retries = done.stderr.count("; retrying in ")
    assert proxy.failed > 0 and proxy.dropped > 0
    assert retries == faults, (retries, proxy.failed, proxy.dropped)
    no_secret(run, done.stderr)


def test_kill_and_resume_from_the_bucket_is_bit_identical(
    s3_server: S3Server, bucket: str, source: Path, local_run: Path, tmp_path: Path
) -> None:
    import subprocess

    url = sharded(s3_server, bucket, source)
    run = tmp_path / "killed"
    argv = _python("toolkit.train", str(DEBUG_RECIPE), *tiny(url, run, *TRAIN))
    proc = subprocess.Popen(argv, env=_env(s3_server), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        steps = [x["step"] for x in read_jsonl(log) if "train/loss" in x] if log.exists() else []
        if steps and steps[-1] >= 5:  # between the checkpoints of steps 4 and 6
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists()
    done = run_command(*argv, env=_env(s3_server))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert same_weights(run, local_run)
    steps = [x["step"] for x in read_jsonl(run / "metrics.jsonl") if "train/loss" in x]
    assert steps == list(range(1, 15))  # none logged twice
    assert losses(run) == losses(local_run)
    no_secret(run, done.stderr)


def test_evaluate_and_predict_read_shards_from_the_bucket(
    s3_server: S3Server, bucket: str, source: Path, local: Path, local_run: Path, tmp_path: Path
) -> None:
    url = sharded(s3_server, bucket, source)
    env = _env(s3_server)
    scores = []
    for shards in (str(local), url):
        done = run_command(*_python("toolkit.evaluate", str(local_run), "--shards", shards,
                                    "--json"), env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
        scores.append(json.loads(out[out.index("{\n") : out.rindex("}") + 1]))
    assert scores[0] == scores[1] and scores[0]
    outs = []
    for shards, name in ((str(local), "a"), (url, "b")):
        out = tmp_path / name
        done = run_command(*_python("toolkit.predict", str(local_run), shards, "--out", str(out),
                                    "--split", "val"), env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")})
    assert outs[0] and outs[0] == outs[1]


def test_resume_reads_only_the_samples_not_yet_consumed(
    s3_server: S3Server, bucket: str, source: Path, local: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In this process, no worker: the bytes a resumed epoch asks the store for are exactly
    those of the samples it goes on to deliver (their spans measured with Python's tarfile),
    and a whole epoch's are those of every sample."""
    from toolkit.core.schema import DataConfig
    from toolkit.data import storage
    from toolkit.data.loader import build_loader

    url = sharded(s3_server, bucket, source)
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    spans = {}  # sample key -> bytes of its members, headers and padding included
    for tar_path in sorted((local / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        size = tar_path.stat().st_size
        starts = [m.offset for m in members] + [size]
        for m, nxt in zip(members, starts[1:], strict=True):
            end = min(nxt, m.offset_data + -(-m.size // 512) * 512)
            key = m.name.split(".")[0]
            spans[key] = spans.get(key, 0) + end - m.offset
    data = DataConfig(shards=url, batch_size=4, num_workers=0, shuffle_buffer=8)

    def counted(loader, state=None, stop=None) -> tuple[list[str], int, object]:
        if state is not None:
            loader.load_state_dict(state)
        before, keys = storage.COUNTS.ranged, []
        for i, batch in enumerate(loader):
            keys += list(batch["key"])
            if stop is not None and i + 1 == stop:
                break
        return keys, storage.COUNTS.ranged - before, loader.state_dict()

    keys, nbytes, _ = counted(build_loader(data, "train", crop=32, seed=0))
    assert sorted(keys) == sorted(spans) and nbytes == sum(spans.values())
    first, _, state = counted(build_loader(data, "train", crop=32, seed=0), stop=2)
    rest, nbytes, _ = counted(build_loader(data, "train", crop=32, seed=0), state=state)
    assert first + rest == keys  # the epoch, once, in order
    assert nbytes == sum(spans[k] for k in rest) < sum(spans.values())


@pytest.mark.parametrize("case", ["bad url", "no bucket", "no credentials", "truncated"])
def test_a_store_that_cannot_serve_the_shards_is_one_line_and_writes_nothing(
    case: str, s3_server: S3Server, bucket: str, source: Path, tmp_path: Path
) -> None:
    url = sharded(s3_server, bucket, source)
    env = _env(s3_server)
    expect = {
        "bad url": "expected s3://BUCKET/PREFIX",
        "no bucket": "not found",
        "no credentials": "no credentials",
        "truncated": "bytes for train/shard-000001.tar",
    }[case]
    if case == "bad url":
        url = "s3://"
    elif case == "no bucket":
        url = "s3://no-such-bucket-here/set"
    elif case == "no credentials":
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                         "AWS_SECRET_ACCESS_KEY")}  # fmt: skip
    else:  # an object cut short after it was listed in the manifest
        client = s3_server.client()
        key = "set/train/shard-000001.tar"
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        full, cut = len(body), len(body) // 2
        client.put_object(Bucket=bucket, Key=key, Body=body[:cut])
        expect = f"records {full} bytes for train/shard-000001.tar, but {url}/{key[4:]} has {cut}"
    run = tmp_path / "run"
    done = run_command(*_python("toolkit.train", str(DEBUG_RECIPE), *tiny(url, run, *TRAIN)),
                       env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert expect in line and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not run.exists()
    if case == "truncated":  # --verify says so too, and which object
        check = run_command(*_python("toolkit.shard", "--verify", url), env=env)
        assert check.returncode == 2
        said = f"shard-000001.tar: {cut} bytes, the manifest says {full}"
        assert said in one_error_line(check.stderr)


def test_a_damaged_object_stops_the_job_naming_it_and_verify_finds_it(
    s3_server: S3Server, bucket: str, source: Path, tmp_path: Path
) -> None:
    """Same size, one byte flipped in a sample: the listing cannot see it; the sample's CRC-32
    does, in the DataLoader worker, and the job stops with that one line; --verify's sha256
    names the object too."""
    url = sharded(s3_server, bucket, source)
    client = s3_server.client()
    key = "set/train/shard-000000.tar"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[700] ^= 0xFF  # inside the first sample's first member
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    run = tmp_path / "run"
    done = run_command(*_python("toolkit.train", str(DEBUG_RECIPE), *tiny(url, run, *TRAIN)),
                       env=_env(s3_server))  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert f"{url}/train/shard-000000.tar" in line and "CRC-32" in line, line
    assert "Traceback" not in done.stderr
    assert not (run / "model.safetensors").exists() and not list(run.glob("checkpoints/step-*"))
    check = run_command(*_python("toolkit.shard", "--verify", url), env=_env(s3_server))
    assert check.returncode == 2 and "shard-000000.tar: sha256" in one_error_line(check.stderr)


def test_sharding_into_a_missing_bucket_or_with_a_credential_flag_is_refused(
    s3_server: S3Server, source: Path
) -> None:
    env = _env(s3_server)
    missing = run_command(*_python("toolkit.shard", str(source), "s3://no-such-bucket-here/x"),
                          env=env)  # fmt: skip
    assert missing.returncode == 2 and "not found" in one_error_line(missing.stderr)
    secret = run_command(*_python("toolkit.shard", str(source), "s3://b/x", "--storage",
                                  f"secret={SECRET}"), env=env)  # fmt: skip
    assert secret.returncode == 2
    assert "credentials come from the environment" in one_error_line(secret.stderr)
    assert SECRET not in secret.stderr


def test_a_local_cache_fetches_each_shard_once_and_only_the_object_the_manifest_names(
    s3_server: S3Server, bucket: str, source: Path, local: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two epochs through `cache_dir`: the batches of the streamed loader, each train shard's
    bytes asked for once; then an object changed under the same size is refused by its sha256,
    and no partial copy stays in the cache."""
    from toolkit.core.schema import DataConfig, StorageConfig
    from toolkit.data import storage
    from toolkit.data.loader import build_loader
    from toolkit.data.storage import StorageError

    url = sharded(s3_server, bucket, source)
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"

    def two_epochs(data: DataConfig) -> tuple[list, int]:
        before, got = storage.COUNTS.ranged, []
        loader = build_loader(data, "train", crop=32, seed=0)
        for _ in range(2):
            got += [(list(b["key"]), b["hr"], b["lr"]) for b in loader]
        return got, storage.COUNTS.ranged - before

    plain = DataConfig(shards=url, batch_size=4, num_workers=0, shuffle_buffer=8)
    streamed, _ = two_epochs(plain)
    kept = DataConfig(shards=url, batch_size=4, num_workers=0, shuffle_buffer=8,
                      storage_options=StorageConfig(cache_dir=str(cache)))  # fmt: skip
    read, nbytes = two_epochs(kept)
    assert [k for k, *_ in read] == [k for k, *_ in streamed]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(read, streamed, strict=True))  # fmt: skip
    train = json.loads((local / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert nbytes == sum(s["bytes"] for s in train)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s['sha256']}.tar" for s in train)

    client, key = s3_server.client(), "set/train/shard-000002.tar"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[600] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    fresh = tmp_path / "fresh"
    kept = DataConfig(shards=url, batch_size=4, num_workers=0, shuffle_buffer=8,
                      storage_options=StorageConfig(cache_dir=str(fresh)))  # fmt: skip
    with pytest.raises(StorageError, match=f"{url}/train/shard-000002.tar: sha256 .* the "
                       "manifest says"):  # fmt: skip
        list(build_loader(kept, "train", crop=32, seed=0))
    assert not any(p.name.startswith(".") for p in fresh.iterdir())


class _Ranged(http.server.BaseHTTPRequestHandler):
    """A static file server that answers byte ranges (206), as a web server in front of a
    shard folder does (Python's own http.server sends whole files)."""

    root: Path

    def _file(self) -> Path | None:
        path = self.root / self.path.lstrip("/").split("?")[0]
        return path if path.is_file() else None

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        got = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if got:
            lo, hi = int(got[1]), int(got[2]) if got[2] else len(data) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            data = data[lo : hi + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # quiet: the test's output is the run's
        pass


def test_a_run_from_an_https_style_url_equals_the_local_run(
    local: Path, local_run: Path, tmp_path: Path
) -> None:
    """Any fsspec URL: fsspec's generic http file system (no listing, block range reads)
    serving the local shard folder gives the weights of the local run."""
    handler = type("Handler", (_Ranged,), {"root": local.parent})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{local.name}"
        run = tmp_path / "http"
        done = cli("toolkit.train", str(DEBUG_RECIPE), *tiny(url, run, *TRAIN))
        assert done.returncode == 0, done.stderr[-3000:]
        assert same_weights(run, local_run) and losses(run) == losses(local_run)
        bad = cli("toolkit.train", str(DEBUG_RECIPE), *tiny(url + "-missing", tmp_path / "x"))
        assert bad.returncode == 2 and "not found" in one_error_line(bad.stderr)
    finally:
        server.shutdown()
        server.server_close()


def test_shards_from_before_indexes_are_read_from_the_bucket_from_their_start(
    s3_server: S3Server, bucket: str, local: Path, local_run: Path, tmp_path: Path
) -> None:
    """A shard folder written before sample indexes (no .idx, no `index` in the manifest),
    copied to a bucket as it is: each shard streamed from its first byte, the same run."""
    client = s3_server.client()
    doc = json.loads((local / "manifest.json").read_text())
    for split in doc["splits"].values():
        for entry in split["shards"]:
            del entry["index"]
            body = (local / entry["name"]).read_bytes()
            client.put_object(Bucket=bucket, Key=f"old/{entry['name']}", Body=body)
    client.put_object(Bucket=bucket, Key="old/manifest.json", Body=json.dumps(doc).encode())
    run = tmp_path / "old"
    done = run_command(*_python("toolkit.train", str(DEBUG_RECIPE),
                                *tiny(f"s3://{bucket}/old", run, *TRAIN)),
                       env=_env(s3_server))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(run, local_run) and losses(run) == losses(local_run)

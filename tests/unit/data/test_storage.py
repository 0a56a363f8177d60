"""The rules of shard URLs without a server: what a URL may hold, which failures are retried and
how often, and how sample spans become requests (the server-backed tests: tests/storage)."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from toolkit.core.errors import UserError
from toolkit.core.schema import StorageConfig
from toolkit.data import storage
from toolkit.data.storage import Remote, StorageError, attempt, locate, parse_options, spans


def test_a_url_is_a_remote_and_file_urls_and_paths_stay_local() -> None:
    assert locate("s3://bucket/a/b/") == Remote("s3://bucket/a/b", StorageConfig())
    assert locate("s3://bucket/a") / "train/x.tar" == Remote("s3://bucket/a/train/x.tar")
    assert locate("file:///data/shards") == Path("/data/shards")
    assert locate("data/shards") == Path("data/shards")
    options = StorageConfig(endpoint_url="http://minio:9000")
    assert locate("s3://b/p", options).options is options


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("s3://", "expected s3://BUCKET/PREFIX"),
        ("s3://AKIA:hunter2@bucket/x", "must not carry credentials"),
    ],
)
def test_a_url_without_a_bucket_or_with_credentials_is_refused(url: str, said: str) -> None:
    with pytest.raises(StorageError, match=said) as err:
        locate(url)
    assert "hunter2" not in str(err.value)


def test_storage_flags_take_the_recipes_keys_and_never_echo_a_secret() -> None:
    got = parse_options(["endpoint_url=http://h:1", "anonymous=true", "attempts=3"])
    assert got == StorageConfig(endpoint_url="http://h:1", anonymous=True, attempts=3)
    refused = [("secret=hunter2", "credentials come from the environment"),
               ("anonymous=yes", "expected true or false"), ("attempts=0", "from 1 to 100"),
               ("endpoint_url", "expected KEY=VALUE"), ("hunter2", "item 1 .no '='.")]  # fmt: skip
    for bad, said in refused:
        with pytest.raises(UserError, match=said) as err:
            parse_options([bad])
        assert "hunter2" not in str(err.value)


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")  # fmt: skip


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (_client_error(503, "SlowDown"), True),
        (_client_error(500, "InternalError"), True),
        (_client_error(429, "TooManyRequests"), True),
        (_client_error(400, "RequestTimeout"), True),
        (_client_error(404, "NoSuchKey"), False),
        (_client_error(403, "AccessDenied"), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(16, "Please reduce your request rate."), True),  # s3fs's translated 503
        (FileNotFoundError("no such bucket"), False),
        (PermissionError("denied"), False),
        (NoCredentialsError(), False),
    ],
)
def test_which_failures_are_tried_again(err: BaseException, transient: bool) -> None:
    assert storage._is_transient(err) is transient


class Flaky:
    """Fails `fails` times (moving `progress` on by `step` each time), then returns "done"."""

    def __init__(self, fails: int, err: BaseException, step: int = 0) -> None:
        self.fails, self.err, self.step, self.calls, self.progress = fails, err, step, 0, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            self.progress += self.step
            raise self.err
        return "done"


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


def test_a_transient_failure_is_retried_up_to_the_attempts_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    where = Remote("s3://b/k", StorageConfig(attempts=4))
    before = storage.COUNTS.retries
    assert attempt(where, "read", Flaky(3, ConnectionResetError())) == "done"
    assert storage.COUNTS.retries - before == 3
    assert caplog.text.count("retrying in") == 3
    with pytest.raises(StorageError, match=r"s3://b/k: read: failed 4 times in a row"):
        attempt(where, "read", Flaky(4, ConnectionResetError()))


def test_a_failure_after_progress_starts_the_count_again() -> None:
    """A long read over a link that drops every so often gets through: each failure after new
    bytes is the first of its run."""
    where = Remote("s3://b/k", StorageConfig(attempts=2))
    flaky = Flaky(10, ConnectionResetError(), step=100)
    assert attempt(where, "read", flaky, progress=lambda: flaky.progress) == "done"
    stuck = Flaky(10, ConnectionResetError(), step=0)
    with pytest.raises(StorageError, match="failed 2 times in a row"):
        attempt(where, "read", stuck, progress=lambda: stuck.progress)
    assert stuck.calls == 2


def test_a_permanent_failure_is_not_retried_and_a_bug_is_not_hidden() -> None:
    where = Remote("s3://b/k", StorageConfig(attempts=8))
    missing = Flaky(8, FileNotFoundError("NoSuchBucket"))
    with pytest.raises(StorageError, match=r"s3://b/k: read: not found"):
        attempt(where, "read", missing)
    assert missing.calls == 1
    bug = Flaky(8, TypeError("a bug"))
    with pytest.raises(TypeError):
        attempt(where, "read", bug)
    assert bug.calls == 1


def test_consecutive_sample_spans_become_one_request() -> None:
    starts, ends = [0, 10, 20, 40, 50], [10, 20, 30, 50, 60]
    assert list(spans(starts, ends)) == [(0, 30), (40, 60)]
    assert list(spans([], [])) == []

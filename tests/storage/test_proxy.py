"""The moto server and the fault proxy themselves, seen through boto3 and s3fs."""

from __future__ import annotations

import http.client
import http.server
import io
import os
import threading
import time

import aiohttp
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, ResponseStreamingError

from tests.storage.proxy import SLOW_DOWN_BODY, FaultProxy
from tests.storage.server import SECRET, S3Server

DATA = os.urandom(100_000)


def test_put_and_get_through_the_proxy(s3_server: S3Server, bucket: str, proxy: FaultProxy):
    client = s3_server.client(proxy.endpoint, attempts=1)
    client.put_object(Bucket=bucket, Key="a/shard-0", Body=DATA)
    assert client.get_object(Bucket=bucket, Key="a/shard-0")["Body"].read() == DATA
    assert client.head_object(Bucket=bucket, Key="a/shard-0")["ContentLength"] == len(DATA)
    client.delete_object(Bucket=bucket, Key="a/shard-0")  # a 204: no body, no Content-Length
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    assert proxy.requests == 5
    assert (proxy.failed, proxy.dropped) == (0, 0)
    assert proxy.bytes_down > len(DATA)
    assert s3_server.count_requests(["GET"], f"/{bucket}/a/shard-0") == 1


def test_multipart_upload_and_copy_through_the_proxy(
    s3_server: S3Server, bucket: str, proxy: FaultProxy
):
    # Two parts: moto, like S3, refuses parts under 5 MiB but the last.
    data = os.urandom(5 * 2**20 + 1000)
    client = s3_server.client(proxy.endpoint, attempts=1)
    five_mib = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    client.upload_fileobj(io.BytesIO(data), bucket, "big", Config=five_mib)
    # moto (5.2.6) keeps the multipart object's composite CRC32 on the copy but drops its "-2"
    # suffix, so botocore would check the copy's body against it and fail; asking CopyObject
    # for a checksum makes moto compute the copy's own.
    source = {"Bucket": bucket, "Key": "big"}
    client.copy_object(Bucket=bucket, Key="copy", CopySource=source, ChecksumAlgorithm="CRC32")
    assert client.get_object(Bucket=bucket, Key="copy")["Body"].read() == data
    assert s3_server.count_requests(["PUT"], f"/{bucket}/big") == 2  # one per part


def test_fail_every_answers_slow_down_without_asking_the_server(
    s3_server: S3Server, bucket: str, proxy: FaultProxy
):
    client = s3_server.client(proxy.endpoint, attempts=1)
    client.put_object(Bucket=bucket, Key="k", Body=DATA)  # PUTs pass: only GETs fail by default
    proxy.fail_every = 1
    with pytest.raises(ClientError) as caught:
        client.get_object(Bucket=bucket, Key="k")
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.failed == 1
    assert s3_server.count_requests(["GET"], f"/{bucket}/") == 0

    # Every second GET fails, counted from the change. (Not left to botocore's retries: their
    # backoff waits up to a second a time.)
    proxy.fail_every = 2
    proxy.reset_counters()
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(client.get_object(Bucket=bucket, Key="k")["Body"].read() == DATA)
        except ClientError as e:
            outcomes.append(e.response["Error"]["Code"])
    assert outcomes == [True, "SlowDown", True, "SlowDown"]
    assert (proxy.requests, proxy.failed) == (4, 2)

    # A PUT that fails has its body read and skipped, so the connection carries on.
    proxy.fail_every, proxy.fail_methods = 1, ("PUT",)
    with pytest.raises(ClientError, match="SlowDown"):
        client.put_object(Bucket=bucket, Key="k2", Body=b"x" * 1000)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == DATA


def test_drop_after_truncates_the_body(s3_server: S3Server, bucket: str, proxy: FaultProxy):
    client = s3_server.client(proxy.endpoint, attempts=1)
    client.put_object(Bucket=bucket, Key="k", Body=DATA)
    proxy.drop_after = 1000
    response = client.get_object(Bucket=bucket, Key="k")  # the head arrives whole
    # urllib3 finds the body short of its Content-Length; botocore wraps that error.
    with pytest.raises(ResponseStreamingError, match=r"IncompleteRead\(1000 bytes read"):
        response["Body"].read()
    assert proxy.dropped == 1
    # A body that fits in drop_after passes whole.
    ranged = client.get_object(Bucket=bucket, Key="k", Range="bytes=0-499")
    assert ranged["ContentRange"] == f"bytes 0-499/{len(DATA)}"
    assert ranged["Body"].read() == DATA[:500]
    assert proxy.dropped == 1


def test_delay_slows_each_response(s3_server: S3Server, bucket: str, proxy: FaultProxy):
    client = s3_server.client(proxy.endpoint, attempts=1)
    client.put_object(Bucket=bucket, Key="k", Body=b"small")
    proxy.delay = 0.3
    start = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"small"
    assert time.monotonic() - start >= 0.3


def test_s3fs_reads_a_range_through_the_proxy(s3_server: S3Server, bucket: str, proxy: FaultProxy):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=DATA)
    fs = s3_server.filesystem(proxy.endpoint, attempts=1)
    assert fs.cat_file(f"{bucket}/k", start=10, end=20) == DATA[10:20]
    # A cut connection reaches s3fs's caller as aiohttp's error, untranslated.
    proxy.drop_after = 1000
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(f"{bucket}/k", start=0, end=50_000)
    # A 503 becomes an OSError (errno EBUSY) with S3's message.
    proxy.drop_after, proxy.fail_every = None, 1
    with pytest.raises(OSError, match="reduce your request rate"):
        fs.cat_file(f"{bucket}/k", start=10, end=20)


def test_s3fs_takes_the_endpoint_from_the_environment(
    s3_server: S3Server, bucket: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
):
    import s3fs

    s3_server.client().put_object(Bucket=bucket, Key="k", Body=DATA)
    monkeypatch.setenv("AWS_PROFILE", "someone-elses")  # a host's setting env() must drop
    env = s3_server.env(proxy.endpoint)
    assert "AWS_PROFILE" not in env
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # no key, no endpoint: all from env
    assert fs.cat_file(f"{bucket}/k", start=10, end=20) == DATA[10:20]
    assert proxy.requests == 1  # AWS_ENDPOINT_URL sent it through the proxy


def test_reset_forgets_every_bucket(s3_server: S3Server, bucket: str):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    s3_server.reset()
    with pytest.raises(ClientError, match="404"):
        client.head_bucket(Bucket=bucket)
    assert s3_server.count_requests() == 1  # the log starts again too: the HEAD only


class _Upstream(http.server.BaseHTTPRequestHandler):
    """A keep-alive HTTP/1.1 server that answers GETs chunked and echoes the size of PUTs."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (b"hello ", b"chunked ", b"world"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "12345")  # and no body, as HEAD has none
        self.end_headers()

    def do_PUT(self) -> None:
        size = len(self.rfile.read(int(self.headers["Content-Length"])))
        body = str(size).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the default writes every request to stderr


def test_proxy_frames_chunked_head_and_put_on_one_kept_alive_connection():
    # moto answers every request with Connection: close and Content-Length, so this framing
    # and keep-alive are checked against a stdlib server instead.
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    # A short poll: shutdown() waits for it.
    threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
            conn.request("GET", "/a")
            assert conn.getresponse().read() == b"hello chunked world"
            sock = conn.sock
            conn.request("HEAD", "/a")
            head = conn.getresponse()
            assert (head.getheader("Content-Length"), head.read()) == ("12345", b"")
            conn.request("PUT", "/a", body=b"x" * 70_000)
            assert conn.getresponse().read() == b"70000"
            proxy.fail_every = 1
            conn.request("GET", "/a")
            failed = conn.getresponse()
            assert (failed.status, failed.read()) == (503, SLOW_DOWN_BODY)
            proxy.fail_every = None
            conn.request("GET", "/a")
            assert conn.getresponse().read() == b"hello chunked world"
            assert conn.sock is sock  # every exchange above went over the one connection
            conn.close()
            assert (proxy.requests, proxy.failed) == (5, 1)
    finally:
        upstream.shutdown()
        upstream.server_close()

"""A moto S3 server on the loopback interface, with the client, credentials and env to reach it."""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

log = logging.getLogger(__name__)

# Test credentials. The secret is distinctive so that a test can grep run directories, logs and
# saved configs for it: finding it anywhere means credentials leaked into an artifact.
ACCESS_KEY = "AKIATOOLKITTESTKEY00"
SECRET = "tkS3cr3t-9f2c1d7e-do-not-log"
REGION = "us-east-1"
# Where the AWS SDKs would otherwise read profiles and credentials of the host: a path that
# does not exist reads as an empty file, so nothing of the host's setup can leak into a test.
NO_FILE = "/nonexistent/aws-config-of-the-tests"


class _RequestLog:
    """WSGI middleware that records (method, path) of every S3 request moto serves."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.entries: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        # The control API's own calls (reset) are not traffic of the code under test.
        if not path.startswith("/moto-api"):
            with self.lock:
                self.entries.append((environ.get("REQUEST_METHOD", ""), path))
        return self.app(environ, start_response)


class S3Server:
    """moto's standalone S3 server in a thread of this process, on 127.0.0.1 and a free port.

    Use it as a context manager or call start() and stop(). Every client it makes signs with
    ACCESS_KEY/SECRET; moto accepts any credentials, so the values only matter for leak checks.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._moto = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self._log: _RequestLog | None = None
        self._client: Any = None
        self.host = host
        self.port = port

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> S3Server:
        # werkzeug logs one INFO line per request to stderr; thousands of range reads drown
        # the test output, and the proxy and count_requests() tell the same story on demand.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto.start()
        self.host, self.port = self._moto.get_host_and_port()
        # moto builds its WSGI app inside the server thread and offers no hook for a
        # middleware; the werkzeug server it keeps exposes the app as a plain attribute.
        server = getattr(self._moto, "_server", None)
        if server is not None and hasattr(server, "app"):
            self._log = _RequestLog(server.app)
            server.app = self._log
        log.info("moto S3 server at %s", self.endpoint)
        return self

    def stop(self) -> None:
        self._moto.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # access ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, endpoint: str | None = None, attempts: int | None = None) -> Any:
        """A boto3 S3 client for this server, or for `endpoint` (a proxy in front of it).

        attempts: how many times botocore sends a request in all (default: its standard mode's
        3); attempts=1 turns retries off, so a test sees every injected fault. (Config's
        retries "max_attempts" counts retries after the first attempt, so max_attempts=1 would
        still send a request twice; "total_max_attempts" is the one that counts them all.)
        """
        if endpoint is None and attempts is None and self._client is not None:
            return self._client  # making a client costs ~0.1 s of loading service models
        config = Config(
            retries={"total_max_attempts": attempts or 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        # An explicit session: neither the host's profiles nor the default session's state
        # (which other code may have configured) take part.
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET, region_name=REGION
        )
        client = session.client("s3", endpoint_url=endpoint or self.endpoint, config=config)
        if endpoint is None and attempts is None:
            self._client = client
        return client

    def filesystem(self, endpoint: str | None = None, attempts: int | None = None) -> Any:
        """An s3fs S3FileSystem for this server (or `endpoint`), fresh, not from fsspec's cache.

        attempts bounds both retry loops, botocore's per request and s3fs's around each call,
        so attempts=1 lets every injected fault through.
        """
        import s3fs  # here, so that the boto3-only tests do not pay for aiobotocore's import

        config: dict[str, Any] = {"s3": {"addressing_style": "path"}}
        if attempts is not None:
            config["retries"] = {"total_max_attempts": attempts, "mode": "standard"}
        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET,
            client_kwargs={"endpoint_url": endpoint or self.endpoint, "region_name": REGION},
            config_kwargs=config,
            skip_instance_cache=True,
        )
        if attempts is not None:
            fs.retries = attempts  # s3fs's own loop: tries each call this many times
        return fs

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Removes the bucket with its objects and unfinished uploads; absent is fine."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
            for up in uploads:
                client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass

    def env(
        self, endpoint: str | None = None, base: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The full environment for a subprocess that talks to this server (or `endpoint`).

        Starts from `base` (default: this process's environment) without any AWS_* variable,
        so a profile, session token or endpoint of the host cannot take part, then adds the
        test credentials, the region and AWS_ENDPOINT_URL, which botocore (>= 1.31) and so
        boto3 and s3fs/aiobotocore read as the endpoint of every service.
        """
        env = dict(os.environ if base is None else base)
        for key in [k for k in env if k.startswith("AWS_")]:
            del env[key]
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL=endpoint or self.endpoint,
            AWS_CONFIG_FILE=NO_FILE,
            AWS_SHARED_CREDENTIALS_FILE=NO_FILE,
            # Without it a failed credential lookup would wait on the EC2 metadata service.
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    # state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets every bucket and object (moto's /moto-api/reset) and the request log."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        if self._log is not None:
            with self._log.lock:
                self._log.entries.clear()

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every S3 request served so far, oldest first."""
        if self._log is None:
            raise NotImplementedError("this moto version keeps its WSGI app out of reach")
        with self._log.lock:
            return list(self._log.entries)

    def count_requests(self, methods: Iterable[str] | None = None, prefix: str = "") -> int:
        """How many S3 requests were served, of these methods and with paths under `prefix`.

        Paths are path-style, "/bucket/key": prefix=f"/{bucket}/" counts one test's bucket.
        """
        wanted = None if methods is None else {m.upper() for m in methods}
        return sum(
            1
            for method, path in self.requests()
            if (wanted is None or method in wanted) and path.startswith(prefix)
        )

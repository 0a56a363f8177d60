"""Fixtures for storage tests: one moto S3 server per session, a fresh bucket and proxy per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.storage.proxy import FaultProxy
from tests.storage.server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    # One server for the session: starting moto costs about a second of imports and threads.
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A new empty bucket, unique in the session, removed with its objects afterwards."""
    # A uuid rather than the test's name: valid bucket names are short and lowercase.
    name = s3_server.make_bucket(f"test-{uuid.uuid4().hex[:20]}")
    yield name
    # Removed rather than the whole server reset, so session-wide state of other fixtures
    # stays; removed at all so the objects of many tests do not pile up in moto's memory.
    s3_server.delete_bucket(name)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's server, with no faults set."""
    with FaultProxy(s3_server.endpoint) as p:
        yield p

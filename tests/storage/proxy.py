"""A fault-injecting HTTP/1.1 proxy (stdlib threads and sockets) to put in front of an S3 server."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId></Error>"
)


class _Dropped(Exception):
    """The proxy cut the client connection on purpose (drop_after)."""


class _Head:
    """A parsed request or response head: the first line and the header fields, raw kept."""

    def __init__(self, first: bytes, fields: list[tuple[str, str]]) -> None:
        self.first = first
        self.fields = fields

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.fields if k.lower() == name), None)

    def has_token(self, name: str, token: str) -> bool:
        value = self.get(name)
        return value is not None and token in (t.strip().lower() for t in value.split(","))

    def encode(self, without: Iterable[str] = ()) -> bytes:
        drop = {n.lower() for n in without}
        kept = [f"{k}: {v}".encode("latin-1") for k, v in self.fields if k.lower() not in drop]
        lines = [self.first, *kept]
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _read_head(reader: io.BufferedReader) -> _Head | None:
    """Reads a request/response head; None at a clean end of the stream before one starts."""
    first = reader.readline(MAX_LINE)
    while first in (b"\r\n", b"\n"):  # RFC 9112 2.2: tolerate blank lines before a request
        first = reader.readline(MAX_LINE)
    if not first:
        return None
    fields: list[tuple[str, str]] = []
    while True:
        line = reader.readline(MAX_LINE)
        if not line:
            raise ConnectionError("stream ended inside a message head")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        fields.append((name.strip(), value.strip()))
    return _Head(first.rstrip(b"\r\n"), fields)


def _read_exact(reader: io.BufferedReader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise ConnectionError(f"stream ended {n - len(data)} bytes short of a body")
    return data


def _chunked_pieces(reader: io.BufferedReader) -> Iterable[bytes]:
    """Yields a chunked body as raw bytes (framing included), ending after the trailers."""
    while True:
        size_line = reader.readline(MAX_LINE)
        if not size_line:
            raise ConnectionError("stream ended inside a chunked body")
        yield size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailer fields, then the empty line
                line = reader.readline(MAX_LINE)
                if not line:
                    raise ConnectionError("stream ended inside chunked trailers")
                yield line
                if line in (b"\r\n", b"\n"):
                    return
        remaining = size + 2  # the chunk's data and its CRLF
        while remaining:
            piece = reader.read(min(CHUNK, remaining))
            if not piece:
                raise ConnectionError("stream ended inside a chunk")
            remaining -= len(piece)
            yield piece


def _body_pieces(
    reader: io.BufferedReader, head: _Head, has_body: bool, until_close: bool = True
) -> Iterable[bytes]:
    """Yields a message body as raw bytes, framed as its head says.

    A message with neither Content-Length nor chunked framing has a body up to the end of the
    stream if it is a response (until_close), and none if it is a request (RFC 9112 6.3).
    """
    if not has_body:
        return
    if head.has_token("Transfer-Encoding", "chunked"):
        yield from _chunked_pieces(reader)
        return
    length = head.get("Content-Length")
    if length is not None:
        remaining = int(length)
        while remaining:
            piece = reader.read(min(CHUNK, remaining))
            if not piece:
                raise ConnectionError(f"stream ended {remaining} bytes short of a body")
            remaining -= len(piece)
            yield piece
        return
    if not until_close:
        return
    while piece := reader.read1(CHUNK):
        yield piece  # no framing: the body ends when the sender closes


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards HTTP/1.1 to `upstream` and injects faults.

    One thread per client connection reads one request at a time (request line, headers, body by
    Content-Length or chunked), then either answers it with a 503 SlowDown itself or forwards it on
    a fresh upstream connection and relays the response (status line, headers, body by
    Content-Length, chunked framing, or until the upstream closes). Requests and responses are
    relayed byte for byte, except that the proxy answers `Expect: 100-continue` itself and drops
    that header upstream.

    Faults, all plain attributes that a test may change while the proxy runs:

    - drop_after: after N bytes of response *body* on one client connection (headers do not count,
      so a response always arrives with its status and Content-Length), the proxy sends exactly
      those N bytes and closes the connection and its upstream. The close is an orderly one
      (shutdown + close, a FIN): every byte sent reaches the client, which then sees the body end
      short of its Content-Length, at exactly byte N. An abortive close (SO_LINGER 0, an RST) would
      throw away what still sits in the send buffer, so the client would see a reset at an
      unpredictable point, sometimes before the headers. A body that fits in N passes intact.
    - delay: seconds to wait before relaying each response (its first bytes).
    - fail_every: the k-th, 2k-th, ... request whose method is in fail_methods (default GET only,
      so that setup's bucket creation and uploads pass) is answered `503 Slow Down` with S3's XML
      error body and is not forwarded. Only those requests count towards k.
    """

    def __init__(
        self,
        upstream: str,
        *,
        drop_after: int | None = None,
        delay: float = 0.0,
        fail_every: int | None = None,
        fail_methods: Iterable[str] = ("GET",),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """upstream: the server's endpoint URL, e.g. "http://127.0.0.1:5000"."""
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream needs a host and a port: {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.drop_after = drop_after
        self.delay = delay
        self.fail_every = fail_every
        self.fail_methods = tuple(fail_methods)
        self.requests = 0  # requests read from clients, all methods
        self.failed = 0  # 503s the proxy answered itself
        self.dropped = 0  # client connections cut by drop_after
        self.bytes_down = 0  # bytes sent to clients: heads and bodies, forwarded or made up
        self._eligible = 0  # requests of fail_methods seen, for fail_every's phase
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.1)  # accept() wakes up to notice stop()
        self.host, self.port = self._listener.getsockname()[:2]
        self._accepter: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.failed = self.dropped = self.bytes_down = self._eligible = 0

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()
        log.info("fault proxy at %s -> %s:%d", self.endpoint, *self.upstream)
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes accept() now instead of at its timeout
            socket.create_connection((self.host, self.port), timeout=1).close()
        if self._accepter is not None:
            self._accepter.join()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wakes the connection threads blocked in recv
            _close(conn)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if self._stop.is_set():
                client.close()
                break
            client.settimeout(None)
            _no_delay(client)
            with self._lock:
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    # one client connection ---------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        state = {"body_sent": 0}  # body bytes sent on this connection, for drop_after
        try:
            while not self._stop.is_set():
                head = _read_head(reader)
                if head is None:
                    break
                if not self._exchange(client, reader, head, state):
                    break
        except _Dropped:
            pass
        except (OSError, ValueError) as e:
            # A client that goes away mid-exchange is normal here: faults make clients give up.
            log.debug("fault proxy connection ended: %r", e)
        finally:
            reader.close()
            _close(client)
            with self._lock:
                self._conns.discard(client)

    def _exchange(
        self,
        client: socket.socket,
        reader: io.BufferedReader,
        request: _Head,
        state: dict[str, int],
    ) -> bool:
        """Handles one request; returns whether the client connection stays open."""
        method = request.first.split(b" ", 1)[0].decode("latin-1").upper()
        http11 = request.first.endswith(b"HTTP/1.1")
        keep_alive = http11 and not request.has_token("Connection", "close")
        with self._lock:
            self.requests += 1
            fail = False
            if method in self.fail_methods:
                self._eligible += 1
                fail = bool(self.fail_every) and self._eligible % self.fail_every == 0
        expects = request.has_token("Expect", "100-continue")
        if fail:
            if expects:
                # The client holds its body back until told to send it; never telling it and
                # closing after the answer keeps the body from being read as the next request.
                self._send_slow_down(client, method, close=True)
                return False
            for _ in _body_pieces(reader, request, True, until_close=False):
                pass  # a request's body is read to find where the next request starts
            self._send_slow_down(client, method, close=not keep_alive)
            return keep_alive
        if expects:
            # Answered here rather than by the server so the whole request can be read first.
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream = socket.create_connection(self.upstream)
        _no_delay(upstream)
        try:
            upstream.sendall(request.encode(without=("Expect",)))
            for piece in _body_pieces(reader, request, True, until_close=False):
                upstream.sendall(piece)
            return self._relay_response(client, upstream, method, state) and keep_alive
        finally:
            _close(upstream)

    def _relay_response(
        self, client: socket.socket, upstream: socket.socket, method: str, state: dict[str, int]
    ) -> bool:
        """Relays one response; returns whether the client connection may carry another."""
        ureader = upstream.makefile("rb")
        try:
            while True:
                response = _read_head(ureader)
                if response is None:
                    raise ConnectionError("upstream closed without a response")
                status = int(response.first.split(b" ", 2)[1])
                if status >= 200:
                    break
                self._send(client, response.encode())  # an interim 1xx: the final one follows
            if self.delay:
                time.sleep(self.delay)
            self._send(client, response.encode())
            has_body = method != "HEAD" and status not in (204, 304)
            framed = (
                response.get("Content-Length") is not None
                or response.has_token("Transfer-Encoding", "chunked")
                or not has_body
            )
            for piece in _body_pieces(ureader, response, has_body):
                self._send_body(client, piece, state)
            return framed and not response.has_token("Connection", "close")
        finally:
            ureader.close()

    def _send_body(self, client: socket.socket, piece: bytes, state: dict[str, int]) -> None:
        limit = self.drop_after
        if limit and state["body_sent"] + len(piece) > limit:
            self._send(client, piece[: max(0, limit - state["body_sent"])])
            state["body_sent"] = limit
            with self._lock:
                self.dropped += 1
            log.debug("fault proxy drops a connection after %d body bytes", limit)
            # An orderly close: the bytes sent so far all arrive, then the stream ends (see the
            # module docstring for why not an RST).
            _close(client)
            raise _Dropped
        self._send(client, piece)
        state["body_sent"] += len(piece)

    def _send_slow_down(self, client: socket.socket, method: str, close: bool) -> None:
        head = (
            b"HTTP/1.1 503 Slow Down\r\n"
            b"Content-Type: application/xml\r\n"
            b"x-amz-request-id: FAULTPROXY\r\n"
            b"Content-Length: " + str(len(SLOW_DOWN_BODY)).encode() + b"\r\n"
        )
        if close:
            head += b"Connection: close\r\n"
        with self._lock:
            self.failed += 1
        log.debug("fault proxy answers a %s with 503 SlowDown", method)
        self._send(client, head + b"\r\n" + (b"" if method == "HEAD" else SLOW_DOWN_BODY))

    def _send(self, client: socket.socket, data: bytes) -> None:
        if data:
            client.sendall(data)
            with self._lock:
                self.bytes_down += len(data)


def _no_delay(sock: socket.socket) -> None:
    # A head and its body leave in separate writes; with Nagle's algorithm the second waits
    # for the peer's delayed ACK, 40 ms an exchange, which would swamp any timing through us.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(sock: socket.socket) -> None:
    """Ends a connection in order (FIN after everything sent) and frees the socket."""
    with contextlib.suppress(OSError):  # already closed by the peer or by us
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

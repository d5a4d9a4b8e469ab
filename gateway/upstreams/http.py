"""A small keep-alive HTTP/1.1 client for upstream calls (asyncio protocol + httptools parser).

Why not a general client: the gateway's overhead budget is under a millisecond, and on the 2-core
target machine a sequential local POST costs about 2.1 ms through httpx 0.28, 0.63 ms through
aiohttp 3.14 and 0.31 ms through this client (the upstream itself answering in ~0.25 ms). It does
only what an OpenAI-compatible upstream needs: POST/GET with a known-length body, one request in
flight per connection, keep-alive pooling per origin, TLS for ``https`` upstreams, chunked and
length-delimited responses (httptools decodes both), gzip/deflate bodies, and streaming reads.
It never follows redirects and does not use proxies.

Timeouts belong to the caller (``asyncio.timeout`` around :meth:`HttpClient.request`, around
:meth:`Response.read` and around each :meth:`Response.next_chunk`); this module only adds the
connect timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class HttpError(Exception):
    """Transport-level failure: ``connect`` (no connection) or ``broken`` (lost mid-exchange)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed endpoint URL plus the request-line prefix and fixed headers, pre-encoded."""

    scheme: str
    host: str
    port: int
    path: bytes
    header_bytes: bytes  # "Host: ...\r\n" + fixed headers, each line CRLF-terminated

    @classmethod
    def build(cls, url: str, headers: dict[str, str]) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
        host_header = parts.hostname if default_port else f"{parts.hostname}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"Host: {host_header}"] + [f"{k}: {v}" for k, v in headers.items()]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("header values must not contain line breaks")
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            path=path.encode("ascii"),
            header_bytes="".join(line + "\r\n" for line in lines).encode("latin-1"),
        )

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one request/response exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._header_name = b""
        self.headers_ready: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.reusable = False
        self.received_any = False
        self.error: HttpError | None = None
        self._wakeup: asyncio.Future[None] | None = None

    # -- exchange control

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reset()
        self.headers_ready = loop.create_future()

    def wait_data(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        if self.chunks or self.complete or self.error:
            self._wakeup.set_result(None)
        return self._wakeup

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    @property
    def keep_alive(self) -> bool:
        return self.reusable and not self.closed

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpError("broken", "unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(HttpError("broken", f"invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(HttpError("broken", "connection closed before the response completed"))

    def _fail(self, error: HttpError) -> None:
        self.error = error
        self.closed = True
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_exception(error)
            self.headers_ready.exception()  # mark retrieved: the caller may have given up
        self._wake()
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        # llhttp's keep-alive verdict is only meaningful inside the message's callbacks
        self.reusable = self._parser.should_keep_alive()
        self.complete = True
        self._wake()


class Response:
    """An upstream response whose headers have arrived; the body is read on demand."""

    def __init__(self, client: HttpClient, target: Target, conn: _Connection) -> None:
        self._client = client
        self._target = target
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._released = False
        encoding = conn.headers.get("content-encoding", "").lower()
        self._decoder = (
            zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip"
            else zlib.decompressobj() if encoding == "deflate"
            else None
        )

    async def next_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises :class:`HttpError`."""
        conn = self._conn
        while True:
            if conn.chunks:
                # everything already received, in one piece: fewer, larger relays downstream
                data = conn.chunks.popleft() if len(conn.chunks) == 1 else b"".join(conn.chunks)
                conn.chunks.clear()
                return self._decoder.decompress(data) if self._decoder else data
            if conn.complete:
                if self._decoder is not None:
                    tail, self._decoder = self._decoder.flush(), None
                    if tail:
                        return tail
                self.release()
                return b""
            if conn.error is not None:
                self.close()
                raise conn.error
            await conn.wait_data()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool if the exchange finished cleanly, else close it."""
        if self._released:
            return
        self._released = True
        if self._conn.complete and self._conn.keep_alive:
            self._client._put(self._target, self._conn)
        else:
            self._close_conn()

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._close_conn()

    def _close_conn(self) -> None:
        self._conn.closed = True
        if self._conn.transport is not None:
            self._conn.transport.close()


class HttpClient:
    """Keep-alive connection pools keyed by origin."""

    def __init__(self, max_idle_per_origin: int = 256) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _put(self, target: Target, conn: _Connection) -> None:
        pool = self._idle.setdefault(target.origin, [])
        if len(pool) < self._max_idle:
            pool.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def _take(self, target: Target) -> _Connection | None:
        pool = self._idle.get(target.origin)
        while pool:
            conn = pool.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, target: Target, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                if target.scheme == "https":
                    _transport, conn = await loop.create_connection(
                        _Connection, target.host, target.port,
                        ssl=self._ssl_context(), server_hostname=target.host,
                    )
                else:
                    _transport, conn = await loop.create_connection(
                        _Connection, target.host, target.port
                    )
        except TimeoutError as exc:
            raise HttpError("connect", "connect timeout") from exc
        except OSError as exc:
            raise HttpError("connect", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
        return conn

    async def request(
        self,
        method: str,
        target: Target,
        body: bytes = b"",
        extra_headers: bytes = b"",
        connect_timeout_s: float = 5.0,
    ) -> Response:
        """Send one request; returns once the response headers arrived."""
        head = (
            method.encode("ascii") + b" " + target.path + b" HTTP/1.1\r\n" + target.header_bytes
            + extra_headers + b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n"
        )
        payload = head + body
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn = self._take(target)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, connect_timeout_s)
            conn.begin(loop)
            assert conn.transport is not None and conn.headers_ready is not None
            conn.transport.write(payload)
            try:
                await conn.headers_ready
            except HttpError:
                # A pooled connection the server had already closed: retry once on a fresh one
                # (nothing was received, so the upstream did not process the request).
                if reused and not conn.received_any and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.closed = True
                conn.transport.close()
                raise
            return Response(self, target, conn)
        raise HttpError("broken", "unreachable")  # pragma: no cover - loop always returns/raises

    async def close(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

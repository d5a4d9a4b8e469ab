"""Calling an OpenAI-compatible upstream, with separate connect, first-byte and total timeouts.

Transport: :mod:`gateway.upstreams.http` (keep-alive pools, one per origin, owned by the app's
lifespan). Timeouts, per provider (routing file):

* ``connect_timeout_s`` - TCP (and TLS) connect;
* ``first_byte_timeout_s`` - from sending the request to the response headers (and, for streams,
  the first SSE event), so a hung upstream is abandoned early and the router falls back;
* ``total_timeout_s`` - the whole non-streaming call;
* ``stream_idle_timeout_s`` - the longest silence between two reads of a stream. A long stream
  that keeps producing is never cut (the seed's 30 s wall clock killed long generations).

Failures are classified so that the router knows whether to fall back:
``connect``/``timeout``/``status``/``malformed``/``cut`` are the upstream's fault (try the next
route); ``rejected`` is a 4xx about the client's own request (do not retry elsewhere; return it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ProviderConfig
from gateway.jsonio import loads
from gateway.upstreams.http import HttpClient, HttpError, Response, Target
from gateway.upstreams.sse import DONE, SSEParser

FailureKind = Literal["connect", "timeout", "status", "malformed", "cut", "rejected"]

# Upstream statuses that are about the client's request, not the upstream's health.
_CLIENT_STATUSES = {400, 413, 422}


class UpstreamFailure(Exception):
    def __init__(
        self,
        kind: FailureKind,
        detail: str,
        status: int | None = None,
        client_message: str | None = None,
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.client_message = client_message

    @property
    def retryable(self) -> bool:
        return self.kind != "rejected"


@dataclass(slots=True)
class Completion:
    """A non-streaming answer: the exact bytes, their parsed form, the response headers."""

    raw: bytes
    data: dict
    latency_ms: float
    headers: dict[str, str] = field(default_factory=dict)


def _client_message(raw: bytes) -> str:
    """The upstream's own error message for a 4xx about the request (truncated, never 5xx text)."""
    try:
        err = loads(raw).get("error")
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = None
    return (message or "the upstream rejected the request")[:500]


class EventStream:
    """An open upstream SSE stream whose first event has already arrived."""

    def __init__(
        self,
        response: Response,
        parser: SSEParser,
        first: list[bytes],
        idle_timeout_s: float,
        first_byte_ms: float,
    ) -> None:
        self._response = response
        self._parser = parser
        self.pending = first
        self._idle = idle_timeout_s
        self.first_byte_ms = first_byte_ms
        self.done = False

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """Yield the event payloads that arrived together, until ``[DONE]``.

        Events that came in one network read are yielded as one batch so the relay can forward
        them in one write; nothing waits for more data than has arrived. Raises
        ``UpstreamFailure('cut')`` if the stream ends without ``[DONE]``.
        """
        while True:
            if self.pending:
                batch, self.pending = self.pending, []
                for i, data in enumerate(batch):
                    if data.strip() == DONE:
                        self.done = True
                        if i:
                            yield batch[:i]
                        return
                yield batch
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._response.next_chunk()
            except TimeoutError as exc:
                raise UpstreamFailure("timeout", "stream idle timeout") from exc
            except HttpError as exc:
                raise UpstreamFailure("cut", f"stream broken: {exc.detail}") from exc
            if not chunk:
                raise UpstreamFailure("cut", "stream ended before [DONE]")
            self.pending = self._parser.feed(chunk)

    def close(self) -> None:
        if self.done:
            # reused only if the HTTP message also ended (release() checks), otherwise closed
            self._response.release()
        else:
            self._response.close()


class UpstreamClient:
    """Sends chat completions to upstreams over pooled keep-alive connections."""

    def __init__(self) -> None:
        self._http = HttpClient()
        self._targets: dict[tuple, Target] = {}

    async def close(self) -> None:
        await self._http.close()

    def _target(self, provider: ProviderConfig) -> Target:
        key = provider.resolved_api_key()
        cache_key = (provider.base_url, key, tuple(sorted(provider.extra_headers.items())))
        target = self._targets.get(cache_key)
        if target is None:
            headers = {"Content-Type": "application/json", "User-Agent": "pura-gateway"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            headers.update(provider.extra_headers)
            target = Target.build(provider.base_url.rstrip("/") + "/chat/completions", headers)
            self._targets[cache_key] = target
        return target

    async def _open(
        self, provider: ProviderConfig, body: bytes, stream: bool, headers: dict[str, str] | None = None
    ) -> Response:
        target = self._target(provider)
        extra = b"Accept: text/event-stream\r\n" if stream else b"Accept: application/json\r\n"
        if headers:
            extra += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        try:
            async with asyncio.timeout(provider.first_byte_timeout_s):
                response = await self._http.request(
                    "POST", target, body, extra, connect_timeout_s=provider.connect_timeout_s
                )
        except TimeoutError as exc:
            raise UpstreamFailure("timeout", "no response headers before first-byte timeout") from exc
        except HttpError as exc:
            kind: FailureKind = "timeout" if exc.detail == "connect timeout" else (
                "connect" if exc.kind == "connect" else "cut"
            )
            raise UpstreamFailure(kind, exc.detail) from exc
        if response.status >= 400:
            try:
                async with asyncio.timeout(provider.connect_timeout_s):
                    raw = await response.read()
            except (TimeoutError, HttpError):
                raw = b""
            if raw:
                response.release()
            else:
                response.close()
            if response.status in _CLIENT_STATUSES:
                raise UpstreamFailure(
                    "rejected", f"HTTP {response.status}", response.status, _client_message(raw)
                )
            raise UpstreamFailure("status", f"HTTP {response.status}", response.status)
        return response

    async def complete(
        self, provider: ProviderConfig, body: bytes, headers: dict[str, str] | None = None
    ) -> Completion:
        started = time.perf_counter()
        response: Response | None = None
        try:
            async with asyncio.timeout(provider.total_timeout_s):
                response = await self._open(provider, body, stream=False, headers=headers)
                raw = await response.read()
        except TimeoutError as exc:
            if response is not None:
                response.close()
            raise UpstreamFailure("timeout", "total timeout") from exc
        except HttpError as exc:
            raise UpstreamFailure("cut", f"body read failed: {exc.detail}") from exc
        try:
            data = loads(raw)
        except ValueError as exc:
            raise UpstreamFailure("malformed", "response is not JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamFailure("malformed", "response has no choices list")
        return Completion(raw=raw, data=data, latency_ms=(time.perf_counter() - started) * 1000,
                          headers=dict(response.headers))

    async def stream(
        self, provider: ProviderConfig, body: bytes, headers: dict[str, str] | None = None
    ) -> EventStream:
        """Open a stream and wait (within the first-byte timeout) for its first event."""
        started = time.perf_counter()
        response = await self._open(provider, body, stream=True, headers=headers)
        parser = SSEParser()
        first: list[bytes] = []
        try:
            async with asyncio.timeout(provider.first_byte_timeout_s):
                while not first:
                    chunk = await response.next_chunk()
                    if not chunk:
                        raise UpstreamFailure("cut", "stream ended before its first event")
                    first = parser.feed(chunk)
        except TimeoutError as exc:
            response.close()
            raise UpstreamFailure("timeout", "no stream event before first-byte timeout") from exc
        except HttpError as exc:
            response.close()
            raise UpstreamFailure("cut", f"stream broken: {exc.detail}") from exc
        except UpstreamFailure:
            response.close()
            raise
        return EventStream(
            response,
            parser,
            first,
            provider.stream_idle_timeout_s,
            first_byte_ms=(time.perf_counter() - started) * 1000,
        )

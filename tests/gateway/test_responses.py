"""EventStreamResponse: what it sends, and that it always closes the body it was given.

The pipeline hands it a relay generator it has already started (its first chunk taken), so that
closing the generator bills what was delivered and closes the upstream; these tests hold the
response to closing it however the response ends.
"""

from __future__ import annotations

import asyncio

from gateway.responses import EventStreamResponse, LastChunk

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


def _body(log: list[str], chunks: list[bytes]):
    async def gen():
        try:
            for chunk in chunks:
                yield chunk
        except GeneratorExit:
            log.append("closed early")
            raise
        log.append("ran to the end")

    return gen()


async def _respond(body, first_taken: bool, send, receive) -> None:
    first = await body.__anext__() if first_taken else None
    await EventStreamResponse(body, first=first)(SCOPE, receive, send)


def _recorder(sent: list[tuple[bytes, bool]]):
    """A client that reads everything: records each body write and whether more follows."""

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append((message["body"], message["more_body"]))

    return send


def _quiet_receive():
    never = asyncio.Event()

    async def receive():
        await never.wait()
        return {"type": "http.disconnect"}

    return receive


def test_sends_the_first_chunk_then_the_rest_and_ends_with_the_last_write() -> None:
    log: list[str] = []
    sent: list[tuple[bytes, bool]] = []

    send = _recorder(sent)
    body = _body(log, [b"a", b"b", LastChunk(b"end")])
    asyncio.run(_respond(body, True, send, _quiet_receive()))
    assert sent == [(b"a", True), (b"b", True), (b"end", False)]
    assert log == ["ran to the end"]


def test_a_body_that_is_one_last_chunk_is_one_write() -> None:
    sent: list[tuple[bytes, bool]] = []

    send = _recorder(sent)
    log: list[str] = []
    asyncio.run(_respond(_body(log, [LastChunk(b"all")]), True, send, _quiet_receive()))
    assert sent == [(b"all", False)] and log == ["ran to the end"]


def test_a_body_without_a_last_chunk_is_ended_by_an_empty_write() -> None:
    log: list[str] = []
    sent: list[tuple[bytes, bool]] = []

    send = _recorder(sent)
    asyncio.run(_respond(_body(log, [b"a", b"b"]), False, send, _quiet_receive()))
    assert sent == [(b"a", True), (b"b", True), (b"", False)] and log == ["ran to the end"]


def test_a_client_leaving_while_the_headers_are_written_closes_the_started_body() -> None:
    """The case the garbage collector used to handle: the client goes away before any body
    chunk is written. The started generator is closed at once (in the pipeline: the relay
    bills what was delivered and closes the upstream)."""
    log: list[str] = []
    headers_sent = asyncio.Event()

    async def slow_send(message):
        if message["type"] == "http.response.start":
            headers_sent.set()
            await asyncio.sleep(30)  # a client that does not read: the write waits

    async def receive():
        await headers_sent.wait()
        return {"type": "http.disconnect"}

    async def main() -> list[str]:
        await asyncio.wait_for(_respond(_body(log, [b"a", b"b", LastChunk(b"end")]), True, slow_send, receive), 5)
        return list(log)  # before asyncio.run's own clean-up of unfinished generators

    assert asyncio.run(main()) == ["closed early"]


def test_a_client_leaving_mid_body_closes_it_too() -> None:
    log: list[str] = []
    writes = 0

    async def send(message):
        nonlocal writes
        if message["type"] == "http.response.body":
            writes += 1
            if writes == 2:
                await asyncio.sleep(30)

    async def receive():
        while writes < 2:
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def main() -> list[str]:
        await asyncio.wait_for(_respond(_body(log, [b"a", b"b", b"c", LastChunk(b"end")]), True, send, receive), 5)
        return list(log)

    assert asyncio.run(main()) == ["closed early"] and writes == 2

"""The server-sent-events response of the chat endpoint.

Starlette's ``StreamingResponse`` runs, under ASGI spec 2.3 (what uvicorn reports), every stream
inside an anyio task group with a second task that listens for the client's disconnect. On the
2-core target machine that task group was the largest single cost of a short stream after the
upstream call itself. :class:`EventStreamResponse` keeps the same behaviour with less: the body
is sent from the request's own task, and one plain asyncio task waits for ``http.disconnect``
and cancels it. The relay generator then sees the cancellation exactly as before (and bills what
was delivered, see ``ChatPipeline._relay``).

It also ends the body in the write of its last chunk (:class:`LastChunk`): a write to the client's
socket costs a system call and usually a wake-up of the client, and a short answer's stream is
only a handful of writes.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class LastChunk(bytes):
    """The final chunk of an :class:`EventStreamResponse` body; the body ends with it."""


class EventStreamResponse(StreamingResponse):
    """``first``: the body's first chunk, already taken from ``content`` by the caller. The
    pipeline takes it before answering so that its relay generator has started: closing a
    started generator runs its cleanup (bill what was delivered, close the upstream), closing
    one that never ran does nothing. The body iterator is always closed when the response ends,
    however it ends (a client leaving while the headers are written included), instead of
    whenever the garbage collector finalises it.
    """

    media_type = "text/event-stream"

    def __init__(self, content, first: bytes | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._first = first

    async def stream_response(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            more = True
            if self._first is not None:
                more = not isinstance(self._first, LastChunk)
                await send({"type": "http.response.body", "body": self._first, "more_body": more})
            async for chunk in self.body_iterator:  # to its end: code after its last yield runs
                if not more:
                    raise RuntimeError("EventStreamResponse: a body chunk after its LastChunk")
                more = not isinstance(chunk, LastChunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if more:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            # This task only runs while the request's task is suspended inside stream_response
            # (nothing between creating it and stream_response awaits, and it is cancelled
            # before anything after it does), so the cancellation always lands in there.
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not disconnected or task.uncancel() > 0:
                raise  # not (only) ours: the server is shutting down
        finally:
            watcher.cancel()
        if self.background is not None:
            await self.background()

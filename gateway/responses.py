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
    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        more = True
        async for chunk in self.body_iterator:
            more = not isinstance(chunk, LastChunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        if more:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

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

"""Cancelling non-streamed work when its HTTP client goes away, so its KV cache slots are freed at once."""

from __future__ import annotations

import asyncio

from fastapi import Request

DISCONNECT_POLL_S = 0.1


async def until_disconnected(request: Request, work):
    """Await work, cancelling it (which frees its KV cache) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            break
    return await task

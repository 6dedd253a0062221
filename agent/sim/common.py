"""Pieces shared by the Asterisk and FreeSWITCH simulator peers."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def next_until_end(queue: asyncio.Queue[T | None], ended: bool,
                         timeout_s: float | None) -> T | None:
    """Next item of a peer's agent-frame queue; None (kept for later readers) once it ended;
    TimeoutError on timeout."""
    if ended and queue.empty():
        return None
    item = await asyncio.wait_for(queue.get(), timeout_s)
    if item is None:
        queue.put_nowait(None)
    return item

"""Grouping of calls that wait together, with no timer: the ingress uses it to send the /v1/recommend bodies
that queued behind a call in one call, and a Recommender replica to decode everything that queued behind a
batch as the next batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Coalescer:
    """``in_flight`` sender tasks each take the first waiting item, then every other item already waiting (at
    most ``max_group``), and hand them to ``send_many`` in one call; each caller gets its own reply. At low load
    an item leaves alone at once (no batch wait); under load, the items that queued during a call leave
    together. ``max_group`` may be changed at any time (it applies from the next group)."""

    def __init__(self, send_many: Callable[[list[Any]], Awaitable[list[Any]]], max_group: int, in_flight: int):
        if max_group < 1 or in_flight < 1:
            raise ValueError(f"Coalescer: max_group and in_flight must be >= 1, got {max_group}, {in_flight}")
        self.max_group = max_group
        self._send_many = send_many
        self._in_flight = in_flight
        self._queue: asyncio.Queue | None = None
        self._senders: list[asyncio.Task] = []

    async def __call__(self, item: Any) -> Any:
        if self._queue is None:  # made on first use, on the event loop that serves the calls
            self._queue = asyncio.Queue()
            self._senders = [asyncio.create_task(self._sender()) for _ in range(self._in_flight)]
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, done))
        return await done

    async def _sender(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            while len(group) < self.max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                replies = await self._send_many([item for item, _ in group])
                if len(replies) != len(group):
                    raise RuntimeError(f"send_many answered {len(replies)} replies for {len(group)} items")
            except Exception as e:  # noqa: BLE001 - every caller of the group gets it
                for _, done in group:
                    if not done.done():
                        done.set_exception(e)
                continue
            for (_, done), out in zip(group, replies, strict=True):
                if not done.done():
                    done.set_result(out)

    async def close(self) -> None:
        """Stop the sender tasks (items still waiting are cancelled)."""
        for t in self._senders:
            t.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                _, done = self._queue.get_nowait()
                done.cancel()
        self._senders, self._queue = [], None

"""Grouping of calls that wait together: the ingress uses it to send the /v1/recommend bodies that queued
behind a call in one call, and a Recommender replica to decode everything that queued behind a batch as the
next batch. There is no fixed batch timer: with ``hold_s`` a group waits (at most that long) only for the
calls the recent load says are on their way, so one client never waits and N closed-loop clients settle into
batches of N instead of alternating big and small ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

LOAD_WINDOW_S = 1.0  # how long a load peak is remembered: the peak of this window and the last one


class Coalescer:
    """``in_flight`` sender tasks each take the first waiting item, then every other item already waiting (at
    most ``max_group``), and hand them to ``send_many`` in one call; each caller gets its own reply. At low load
    an item leaves alone at once; under load, the items that queued during a call leave together.

    With ``hold_s > 0`` a group smaller than the expected load (the most items outstanding at once, arrival
    to reply, over the last one to two ``window_s``) waits up to ``hold_s`` for more to arrive, when that load
    fits in one group (``max_group``); a larger load leaves a backlog that fills the groups anyway, so there
    it never waits. With 8 closed-loop clients that is the 8 requests; with one client it is the one, which
    leaves at once.
    ``max_group`` and ``hold_s`` may be changed at any time (they apply from the next group)."""

    def __init__(self, send_many: Callable[[list[Any]], Awaitable[list[Any]]], max_group: int, in_flight: int,
                 hold_s: float = 0.0, window_s: float = LOAD_WINDOW_S):
        if max_group < 1 or in_flight < 1:
            raise ValueError(f"Coalescer: max_group and in_flight must be >= 1, got {max_group}, {in_flight}")
        if hold_s < 0 or window_s <= 0:
            raise ValueError(f"Coalescer: hold_s must be >= 0 and window_s > 0, got {hold_s}, {window_s}")
        self.max_group, self.hold_s = max_group, hold_s
        self._send_many = send_many
        self._in_flight = in_flight
        self._queue: asyncio.Queue | None = None
        self._arrived: asyncio.Event | None = None
        self._senders: list[asyncio.Task] = []
        self._outstanding = 0          # items between arrival and reply
        self._peak = [0, 0]            # most outstanding at once: this window, the last one
        self._window_s, self._window_end = window_s, 0.0

    def expected(self) -> int:
        """The recent load: most items outstanding at once over the last one to two windows."""
        return max(self._peak)

    def _note_arrival(self, now: float) -> None:
        if now >= self._window_end:
            # a window with no arrival at all ends the memory of the peak
            self._peak = [0, self._peak[0] if now < self._window_end + self._window_s else 0]
            self._window_end = now + self._window_s
        self._peak[0] = max(self._peak[0], self._outstanding)

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._queue is None:  # made on first use, on the event loop that serves the calls
            self._queue, self._arrived = asyncio.Queue(), asyncio.Event()
            self._senders = [asyncio.create_task(self._sender()) for _ in range(self._in_flight)]
        done: asyncio.Future = loop.create_future()
        self._outstanding += 1
        try:
            self._note_arrival(loop.time())
            self._queue.put_nowait((item, done))
            self._arrived.set()
            return await done
        finally:
            self._outstanding -= 1

    def _take_waiting(self, group: list) -> None:
        assert self._queue is not None
        while len(group) < self.max_group and not self._queue.empty():
            group.append(self._queue.get_nowait())

    async def _hold(self, group: list) -> None:
        """Wait up to ``hold_s`` for the group to reach the expected load (never past ``max_group``)."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_s
        target = self.expected()
        if target > self.max_group:  # more load than one group: a backlog keeps the groups full, never wait
            self._take_waiting(group)
            return
        while True:
            self._arrived.clear()  # before taking: an arrival after the take sets it again
            self._take_waiting(group)
            left = deadline - loop.time()
            if len(group) >= target or left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                self._take_waiting(group)
                return

    async def _sender(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            if self.hold_s > 0:
                await self._hold(group)
            else:
                self._take_waiting(group)
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
        self._senders, self._queue, self._arrived = [], None, None

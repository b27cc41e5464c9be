"""``sidrec.serve.coalesce.Coalescer``: what waits together leaves together, nothing waits at low load,
every caller gets its own reply (or the group's error), ``max_group`` caps a group, the hold gathers the
recent load and never delays a lone client."""

import asyncio
import time

import pytest

from sidrec.serve.coalesce import Coalescer


class Recorder:
    """``send_many`` that records its groups and holds each call until released."""

    def __init__(self, fail_on: int | None = None):
        self.groups: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.groups.append(list(items))
        await self.release.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"boom on {self.fail_on}")
        return [10 * i for i in items]


def test_a_lone_request_leaves_at_once_and_the_queue_leaves_together():
    async def main():
        send = Recorder()
        c = Coalescer(send, max_group=32, in_flight=1)
        first = asyncio.create_task(c(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert send.groups == [[1]]  # no batch wait: sent before anything else arrived
        rest = [asyncio.create_task(c(i)) for i in range(2, 7)]
        await asyncio.sleep(0.01)
        assert send.groups == [[1]]  # the one call in flight holds the others back
        send.release.set()
        assert await first == 10 and [await t for t in rest] == [20, 30, 40, 50, 60]
        assert send.groups == [[1], [2, 3, 4, 5, 6]]  # each caller its own reply, the queue in one call
        await c.close()

    asyncio.run(main())


def test_in_flight_and_max_group():
    async def main():
        send = Recorder()
        c = Coalescer(send, max_group=3, in_flight=2)
        tasks = [asyncio.create_task(c(i)) for i in range(8)]
        await asyncio.sleep(0.01)
        assert len(send.groups) == 2 and all(len(g) <= 3 for g in send.groups)  # two calls out at once
        c.max_group = 2  # applies from the next group
        send.release.set()
        assert [await t for t in tasks] == [10 * i for i in range(8)]
        assert sorted(i for g in send.groups for i in g) == list(range(8))
        assert all(len(g) <= 2 for g in send.groups[2:])
        await c.close()

    asyncio.run(main())


def test_a_failed_call_fails_its_own_group_only():
    async def main():
        send = Recorder(fail_on=1)
        c = Coalescer(send, max_group=32, in_flight=1)
        first = asyncio.create_task(c(1))
        await asyncio.sleep(0.01)
        later = [asyncio.create_task(c(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        send.release.set()
        with pytest.raises(RuntimeError, match="boom on 1"):
            await first
        assert [await t for t in later] == [20, 30]  # the sender keeps serving after an error
        await c.close()

    asyncio.run(main())


def test_a_wrong_number_of_replies_is_an_error_not_a_misdelivery():
    async def main():
        async def short(items):
            return items[:-1]

        c = Coalescer(short, max_group=8, in_flight=1)
        with pytest.raises(RuntimeError, match="1 replies for 2 items"):
            await asyncio.gather(c(1), c(2))
        await c.close()

    asyncio.run(main())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_group and in_flight"):
        Coalescer(Recorder(), max_group=0, in_flight=1)


class Instant:
    """``send_many`` that records its groups and answers at once."""

    def __init__(self):
        self.groups: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.groups.append(list(items))
        return [10 * i for i in items]


def test_hold_gathers_the_recent_load_into_one_batch():
    """3 closed-loop clients: after a round of 3 outstanding at once, a lone arrival waits (up to hold_s) for
    the other two instead of leaving alone; without the hold it leaves alone."""

    async def main(hold_s: float) -> list[list[int]]:
        send = Instant()
        c = Coalescer(send, max_group=8, in_flight=1, hold_s=hold_s)
        await asyncio.gather(*(c(i) for i in (1, 2, 3)))
        assert c.expected() == 3
        first = asyncio.create_task(c(4))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(c(i)) for i in (5, 6)]
        assert [await first, *[await t for t in rest]] == [40, 50, 60]
        await c.close()
        return send.groups

    assert asyncio.run(main(hold_s=0.0)) == [[1, 2, 3], [4], [5, 6]]
    assert asyncio.run(main(hold_s=2.0)) == [[1, 2, 3], [4, 5, 6]]


def test_hold_never_delays_a_lone_client_and_is_bounded():
    async def lone() -> float:
        send = Instant()
        c = Coalescer(send, max_group=8, in_flight=1, hold_s=2.0)
        t = time.perf_counter()
        for i in range(5):  # one client, back to back: the load is 1, nothing to wait for
            assert await c(i) == 10 * i
        await c.close()
        assert send.groups == [[i] for i in range(5)]
        return time.perf_counter() - t

    assert asyncio.run(lone()) < 0.5

    async def straggler_never_comes() -> float:
        send = Instant()
        c = Coalescer(send, max_group=8, in_flight=1, hold_s=0.2)
        await asyncio.gather(*(c(i) for i in (1, 2, 3)))
        t = time.perf_counter()
        assert await c(4) == 40  # expected 3, only one comes: it leaves when the hold runs out
        waited = time.perf_counter() - t
        await c.close()
        return waited

    waited = asyncio.run(straggler_never_comes())
    assert 0.15 < waited < 1.0


def test_the_load_estimate_forgets_an_old_peak():
    async def main():
        c = Coalescer(Instant(), max_group=8, in_flight=1, window_s=0.05)
        await asyncio.gather(*(c(i) for i in range(5)))
        assert c.expected() == 5
        await c(6)
        assert c.expected() == 5  # still this window's peak
        await asyncio.sleep(0.06)
        await c(7)
        assert c.expected() == 5  # the last window's
        await asyncio.sleep(0.15)  # whole windows without arrivals
        await c(9)
        assert c.expected() == 1
        await c.close()

    asyncio.run(main())


def test_bad_hold_is_refused():
    with pytest.raises(ValueError, match="hold_s must be >= 0"):
        Coalescer(Recorder(), max_group=1, in_flight=1, hold_s=-1)


def test_hold_never_waits_when_the_load_is_more_than_one_group():
    """5 outstanding at once with groups of at most 2: a backlog fills every group, so a short one leaves
    at once instead of holding for a full one."""

    async def main() -> float:
        send = Instant()
        c = Coalescer(send, max_group=2, in_flight=1, hold_s=2.0)
        await asyncio.gather(*(c(i) for i in range(5)))
        assert c.expected() == 5
        t = time.perf_counter()
        assert await c(7) == 70
        waited = time.perf_counter() - t
        await c.close()
        return waited

    assert asyncio.run(main()) < 0.5

"""``sidrec.serve.coalesce.Coalescer``: what waits together leaves together, nothing waits at low load,
every caller gets its own reply (or the group's error), ``max_group`` caps a group."""

import asyncio

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

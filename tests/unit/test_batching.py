import asyncio
import threading

import pytest
import torch

from app.batching import MicroBatcher
from app.errors import Overloaded
from switchbank.engine import Result, Route
from switchbank.errors import NotFound


class FakeEngine:
    """Records batch sizes; optionally blocks until released; fails requests for task 'bad'."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, x, routes):
        self.gate.wait(5)
        self.batches.append(len(routes))
        if any(r.task == "bad" for r in routes):
            raise NotFound("no switch named 'bad'")
        return [Result(r.task or "auto", {}, "task", x[i].flatten()[:2], ["a", "b"]) for i, r in enumerate(routes)]


def test_requests_are_batched_and_bad_ones_isolated():
    async def main():
        eng = FakeEngine()
        b = MicroBatcher(eng, max_batch=8, max_wait_s=0.05, queue_limit=32, timeout_s=10)
        b.start()
        routes = [Route(task="ok")] * 5 + [Route(task="bad")] + [Route(task="ok")] * 2
        outs = await asyncio.gather(*(b.submit(torch.full((3, 2, 2), float(i)), r) for i, r in enumerate(routes)),
                                    return_exceptions=True)
        await b.stop()
        return eng, outs

    eng, outs = asyncio.run(main())
    assert eng.batches[0] == 8  # all eight gathered into one batch
    assert isinstance(outs[5], NotFound)
    assert [float(o.probs[0]) for i, o in enumerate(outs) if i != 5] == [0, 1, 2, 3, 4, 6, 7]


def test_full_queue_answers_overloaded():
    async def main():
        eng = FakeEngine()
        eng.gate.clear()  # the engine is stuck: the queue fills up
        b = MicroBatcher(eng, max_batch=1, max_wait_s=0, queue_limit=2, timeout_s=10)
        b.start()
        tasks = [asyncio.create_task(b.submit(torch.zeros(3, 2, 2), Route(task="ok")))]
        await asyncio.sleep(0.1)  # the first is in the engine
        tasks += [asyncio.create_task(b.submit(torch.zeros(3, 2, 2), Route(task="ok"))) for _ in range(2)]
        await asyncio.sleep(0.1)  # two more waiting: the queue is full
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit(torch.zeros(3, 2, 2), Route(task="ok"))
        eng.gate.set()  # load drops: everything queued completes
        done = await asyncio.gather(*tasks)
        await b.stop()
        return done

    assert len(asyncio.run(main())) == 3


def test_lone_request_runs_at_once():
    # nothing else is on its way: the batch does not sit out its 30 s wait for company
    async def main():
        eng = FakeEngine()
        b = MicroBatcher(eng, max_batch=8, max_wait_s=30, queue_limit=32, timeout_s=60)
        b.start()
        out = await asyncio.wait_for(b.submit(torch.zeros(3, 2, 2), Route(task="ok")), 10)
        await b.stop()
        return eng, out

    eng, out = asyncio.run(main())
    assert eng.batches == [1] and out.head == "ok"


def test_batch_waits_for_a_request_on_its_way():
    async def main():
        eng = FakeEngine()
        b = MicroBatcher(eng, max_batch=2, max_wait_s=30, queue_limit=32, timeout_s=60)
        b.start()
        with b.arriving():  # a second request is being read and decoded
            first = asyncio.create_task(b.submit(torch.zeros(3, 2, 2), Route(task="ok")))
            await asyncio.sleep(0.2)
            assert not first.done() and not eng.batches  # its batch waits for the second
        second = await asyncio.wait_for(b.submit(torch.ones(3, 2, 2), Route(task="ok")), 10)
        await first
        await b.stop()
        return eng, first.result(), second

    eng, first, second = asyncio.run(main())
    assert eng.batches == [2]
    assert (float(first.probs[0]), float(second.probs[0])) == (0.0, 1.0)


def test_arriving_is_released_when_reading_fails():
    async def main():
        b = MicroBatcher(FakeEngine(), max_batch=8, max_wait_s=30, queue_limit=32, timeout_s=60)
        with pytest.raises(ValueError):
            with b.arriving():
                raise ValueError("not an image")
        return b._arriving

    assert asyncio.run(main()) == 0

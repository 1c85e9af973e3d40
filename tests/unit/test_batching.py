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

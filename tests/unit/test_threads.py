import asyncio
import os
import threading

from app.threads import run_apart


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_work_run_apart_yields_the_cpu_to_requests_on_a_thread_that_ends_with_it():
    main = _niceness()

    def work():
        return _niceness(), threading.current_thread()

    nice, thread = asyncio.run(run_apart(work))
    assert nice >= min(19, main + 1) and _niceness() == main
    thread.join(5)
    assert not thread.is_alive()

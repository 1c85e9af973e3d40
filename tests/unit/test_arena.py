import threading

import pytest
import torch

from switchbank.arena import run_apart


def test_runs_on_a_thread_that_ends_with_it_and_returns_its_value():
    seen = {}

    def work(a, b=0):
        seen["thread"] = threading.current_thread()
        return a + b

    assert run_apart(work, 2, b=3) == 5
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_an_error_reaches_the_caller():
    def fail():
        raise KeyError("no such tensor")

    with pytest.raises(KeyError, match="no such tensor"):
        run_apart(fail)


def test_the_callers_grad_and_inference_modes_hold_there():
    probe = lambda: (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # noqa: E731
    assert run_apart(probe) == (True, False)
    with torch.no_grad():
        assert run_apart(probe) == (False, False)
    with torch.inference_mode():
        assert run_apart(probe) == (False, True)
        made = run_apart(lambda: torch.ones(2) * 2)
    assert made.is_inference()


def test_a_call_from_inside_runs_in_place():
    def outer():
        here = threading.current_thread()
        return here, run_apart(threading.current_thread)

    outer_thread, inner_thread = run_apart(outer)
    assert outer_thread is inner_thread

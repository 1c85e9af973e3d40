"""Short runs of the reliability harness (bench/reliability.py runs them longer)."""

from bench import reliability


def test_sigkill_during_admin_changes_never_leaves_a_partial_bank():
    result = reliability.crash(rounds=3, seed=1)
    assert result["ok"] and result["kills"] == 3


def test_overload_answers_503_with_retry_after_and_recovers():
    result = reliability.overload(seconds=4, concurrency=48)
    assert result["flood"]["statuses"].get(503, 0) > 0
    assert result["flood"]["retry_after"] == ["1"]
    assert result["after"]["statuses"] == {200: result["after"]["statuses"][200]}

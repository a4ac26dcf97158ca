"""adv.retry: the one waiting policy of the driver's, the red team's and the replicas' polls and retries."""

from __future__ import annotations

import itertools

import pytest

from adv.retry import delays, wait_until


def test_delays_grow_to_the_cap_and_stay_there():
    assert list(itertools.islice(delays(0.05, 0.25), 6)) == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25, 0.25])


def test_wait_until_returns_as_soon_as_the_check_holds():
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), timeout_s=5, interval=0.001) is True


def test_wait_until_gives_up_at_the_deadline_and_a_raising_check_stops_it():
    n = []
    assert wait_until(lambda: n.append(1) or False, timeout_s=0.05, interval=0.01) is False
    assert 2 <= len(n) <= 10

    def failed():
        raise RuntimeError("deploy failed")

    with pytest.raises(RuntimeError, match="deploy failed"):
        wait_until(failed, timeout_s=5)

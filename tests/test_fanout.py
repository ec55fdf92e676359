"""The one parallel-map helper (cloud.fanout): bounded, ordered, every error kept, a deadline that leaves
items not started alone."""

import threading
import time

import pytest

from cloud.fanout import fan_out, parallel_map


def test_no_more_calls_at_once_than_the_bound():
    lock, now, peak = threading.Lock(), [0], [0]

    def call(i: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return i * i

    assert parallel_map(call, list(range(40)), max_parallel=4) == [i * i for i in range(40)]
    assert peak[0] == 4


def test_every_error_is_kept_and_the_first_is_raised_once_all_ended():
    ended: list[int] = []

    def call(i: int) -> int:
        time.sleep(0.01 * (10 - i))
        ended.append(i)
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return i

    res = fan_out(list(range(10)), call, name=str, max_parallel=3)
    assert sorted(res.done) == [str(i) for i in range(10) if i not in (3, 7)]
    assert {k: str(e) for k, e in res.errors.items()} == {"3": "item 3", "7": "item 7"}
    ended.clear()
    with pytest.raises(ValueError, match="item 3"):
        parallel_map(call, list(range(10)), max_parallel=3)
    assert sorted(ended) == list(range(10))


def test_a_deadline_reports_calls_out_and_items_never_started():
    started: list[int] = []

    def call(i: int) -> None:
        started.append(i)
        time.sleep(2)

    res = fan_out(list(range(6)), call, name=str, timeout=0.5, max_parallel=2)
    assert sorted(res.pending) == [str(i) for i in range(6)] and not res.done
    time.sleep(2.5)  # the two calls out end; nothing else starts after the deadline
    assert sorted(started) == [0, 1]

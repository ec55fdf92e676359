"""Connecting through Ray Client survives the head's client server failing to start one client's server."""

import pytest
import ray

from pipeline import tasks

RACE = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=1770)"
)


def test_a_failed_client_server_start_is_tried_again(monkeypatch):
    calls = []

    def init(address=None, **kwargs):  # Ray's ray.init, failing as the head's proxier did once
        calls.append(address)
        if len(calls) == 1:
            raise ConnectionAbortedError(RACE)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(tasks.time, "sleep", lambda s: None)
    tasks._init_ray_client("ray://10.0.0.1:10001", {})
    assert calls == ["ray://10.0.0.1:10001"] * 2


def test_other_failures_and_a_lasting_one_are_raised(monkeypatch):
    calls = []

    def refused(address=None, **kwargs):
        calls.append(address)
        raise ConnectionAbortedError("Ray client has already been connected")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ConnectionAbortedError, match="already been connected"):
        tasks._init_ray_client("ray://10.0.0.1:10001", {})
    assert len(calls) == 1

    def always(address=None, **kwargs):
        calls.append(address)
        raise ConnectionAbortedError(RACE)

    calls.clear()
    monkeypatch.setattr(ray, "init", always)
    monkeypatch.setattr(tasks.time, "sleep", lambda s: None)
    with pytest.raises(ConnectionAbortedError, match="Initialization failure"):
        tasks._init_ray_client("ray://10.0.0.1:10001", {})
    assert len(calls) == tasks.CLIENT_START_ATTEMPTS

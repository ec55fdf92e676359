"""What a sweep on an autoscaling cluster shows while it waits: the autoscaler's launches and a failed launch,
read from `ray status` text as Ray's own formatter writes it (no hosts needed)."""

import io
import time

from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest, NodeInfo
from ray.autoscaler.v2.utils import ClusterStatusFormatter

from cloud.elastic import autoscaler_note
from pipeline.runner import Progress


def _status(**kw) -> str:
    return ClusterStatusFormatter.format(ClusterStatus(**kw), verbose=False)


def _launch(state, node_type="ray.worker.default", count=1, ago=0):
    return LaunchRequest(
        instance_type_name="standard.medium",
        ray_node_type_name=node_type,
        count=count,
        state=state,
        request_ts_s=int(time.time()) - ago,
        details="403: the API key is not allowed to call create-instance",
    )


def test_nothing_to_say_on_a_quiet_cluster():
    assert autoscaler_note(_status()) is None


def test_launches_under_way_are_named():
    pending = [_launch(LaunchRequest.Status.PENDING), _launch(LaunchRequest.Status.PENDING)]  # Ray counts requests
    note = autoscaler_note(_status(pending_launches=pending))
    assert note is not None and "ray.worker.default, 2 launching" in note


def test_nodes_that_are_starting_are_counted_by_type_not_listed_by_instance_id():
    """Instances made but not yet in Ray (Ray lists each as `<instance id>: <type>, <details>`, the details often
    empty): one count a type, with what the autoscaler says of them."""
    pending = [
        NodeInfo("standard.medium", "ray.worker.default", "7fac465e-0b1c-4b6e-9d8a-3f1e2d4c5b6a", "", details=""),
        NodeInfo("standard.medium", "ray.worker.default", "8f6aa49e-1c2d-4e5f-8a9b-0c1d2e3f4a5b", "", details=""),
        NodeInfo("standard.small", "gpu", "9a7bb5af-2d3e-4f50-9b0c-1d2e3f4a5b6c", "", details="waiting-for-ssh"),
    ]
    launch = [_launch(LaunchRequest.Status.PENDING)]
    note = autoscaler_note(_status(pending_nodes=pending, pending_launches=launch))
    assert note == (
        "autoscaler: ray.worker.default, 1 launching; ray.worker.default, 2 starting; gpu, 1 starting (waiting-for-ssh)"
    ), note


def test_the_newest_failed_launch_is_shown():
    failed = [
        _launch(LaunchRequest.Status.FAILED, "ray.worker.old", ago=300),
        _launch(LaunchRequest.Status.FAILED, "ray.worker.gpu", ago=5),
    ]
    note = autoscaler_note(_status(failed_launches=failed))
    assert note is not None and "launch failed" in note and "ray.worker.gpu: LaunchFailed" in note, note
    assert "ray.worker.old" not in note


def test_idle_terminations_are_not_failures():
    gone = NodeInfo("standard.medium", "ray.worker.default", "i-1", "10.0.0.2", details="idle")
    assert autoscaler_note(_status(failed_nodes=[gone])) is None


def test_the_progress_line_carries_the_note_and_prints_when_it_changes():
    out = io.StringIO()
    note = {"text": None}
    p = Progress(4, stream=out, slots=1, note=lambda: note["text"])
    p.update(0, 0, 4)
    note["text"] = "autoscaler: launch failed: ray.worker.default: LaunchFailed (latest_attempt: 12:00:00)"
    p.update(0, 0, 4)  # same counts, new note: a line in logs too
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "autoscaler" not in lines[0] and lines[1].endswith(note["text"]), lines


def test_slots_may_follow_a_growing_cluster():
    out = io.StringIO()
    slots = {"n": 1}
    p = Progress(6, stream=out, slots=lambda: slots["n"])
    p.update(0, 0, 6)
    slots["n"] = 3
    p.update(0, 0, 6)
    first, second = out.getvalue().splitlines()
    assert "running 1, queued 5" in first and "running 3, queued 3" in second, (first, second)

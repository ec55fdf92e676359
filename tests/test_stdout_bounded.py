"""A trial's stdout is read on the node: the driver does not grow with what a trial prints (issue 23.1), and
the line reader keeps a bounded tail, the last line, the last JSON line holding the metric."""

import json

from bench.stdout_rss import driver_peak_rss_mb
from pipeline.lines import MAX_LINE, LineReader, ProgressSpec, Watch


def test_a_trial_printing_200_mb_does_not_grow_the_driver():
    small = driver_peak_rss_mb(1024, timeout=300)
    big = driver_peak_rss_mb(200 * 1024 * 1024, timeout=300)
    assert big - small < 50, f"the driver's peak RSS grew from {small:.0f} MB to {big:.0f} MB"


def test_the_reader_holds_a_tail_the_last_lines_and_progress_whatever_the_chunks():
    reports = []
    r = LineReader(
        Watch(json_key="loss", progress=ProgressSpec("acc", "epoch"), tail_bytes=100),
        lambda s, v: reports.append((s, v)),
    )
    text = b"".join(
        [
            b"noise " * 50_000 + b"\n",  # a line longer than MAX_LINE: cut, not kept whole
            json.dumps({"epoch": 1, "acc": 0.5}).encode() + b"\n",
            json.dumps({"epoch": 2, "acc": "nan"}).encode() + b"\n",  # not a number: ignored, counted
            json.dumps({"epoch": 1, "acc": 0.7}).encode() + b"\n",  # backwards: ignored, counted
            json.dumps({"epoch": 3, "acc": 0.8, "loss": 0.25}).encode() + b"\n",
            b"0.125",  # the last line, without a newline
        ]
    )
    for i in range(0, len(text), 777):  # chunks that cut lines anywhere
        r.feed(text[i : i + 777])
    r.close()
    w = r.result()
    assert reports == [(1.0, 0.5), (3.0, 0.8)] and w.reports == reports
    assert (w.ignored, w.backwards) == (1, 1)
    assert w.last_line == "0.125" and json.loads(w.json_line)["loss"] == 0.25
    assert w.tail == text[-100:] and w.bytes == len(text) and w.lines == 6
    assert len(r._partial) <= MAX_LINE

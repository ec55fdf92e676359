import io

from cloud.remote import _prefixed_lines


def test_partial_writes_and_flushes_make_whole_prefixed_lines():
    out = io.StringIO()
    w = _prefixed_lines("node-1", out)
    for chunk in ["A", "", "B\nC", "D\n", "tail"]:
        w.write(chunk)
        w.flush()  # invoke flushes after every chunk
    assert out.getvalue() == "node-1 | AB\nnode-1 | CD\n"
    w.finish()
    assert out.getvalue().endswith("node-1 | tail\n")

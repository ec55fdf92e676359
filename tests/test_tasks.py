import os
import time
from pathlib import Path

import pytest
import ray

from pipeline import tasks
from pipeline.tasks import Execute, ExecuteError


@pytest.fixture(autouse=True)
def _ray(ray_local):
    return ray_local


def out(t, name="stdout"):
    return t.outputs[name].fetch().get_str()


def test_string_args_split_like_a_shell():
    t = Execute("printf '%s|' 'a b' c", stdout=True)
    assert out(t) == "a b|c|"


def test_data_in_args_mapped_to_random_relative_names():
    d = tasks.blob("hello\n", "greeting.txt")
    t = Execute(["sh", "-c", 'echo "$1"; cat "$1"', "sh", d], stdout=True)
    name, content = out(t).splitlines()
    assert not os.path.isabs(name) and "/" not in name and name.endswith(".txt")
    assert content == "hello"


def test_input_paths_stdin_outputs_and_chaining():
    first = Execute(
        ["sh", "-c", "mkdir -p o && sort < in/data > o/sorted && wc -l < in/data"],
        input_paths={"in/data": tasks.blob("c\nb\na\n")},
        output_paths=["o/sorted"],
        stdout=True,
    )
    assert out(first).strip() == "3"
    assert first.outputs["o/sorted"].fetch().get_bytes() == b"a\nb\nc\n"
    second = Execute("tr a-z A-Z", stdin=first.outputs["o/sorted"], stdout=True)
    assert out(second) == "A\nB\nC\n"
    third = Execute(["cat", second], stdout=True)  # a task as an argument: its single output
    assert third.output.fetch().get_str() == "A\nB\nC\n"


def test_output_property_errors_when_not_single():
    t = Execute("touch a b", output_paths=["a", "b"])
    with pytest.raises(ValueError, match="has 2 outputs"):
        _ = t.output
    none = Execute("true")
    with pytest.raises(ValueError, match="has 0 outputs"):
        _ = none.output
    with pytest.raises(ValueError, match="has 0 outputs"):
        Execute(["cat", none])


def test_task_directory_is_fresh_and_removed():
    a = Execute("sh -c 'pwd; ls -A | wc -l; touch left-behind'", stdout=True)
    cwd, count = out(a).split()
    assert count == "0"
    a.wait()
    deadline = time.monotonic() + 30  # removed by the worker soon after the task, off its path
    while Path(cwd).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(cwd).exists(), f"task directory {cwd} still there 30 s after the task"
    b = Execute("pwd", stdout=True)
    assert out(b).strip() != cwd


def test_failure_carries_name_code_and_stderr():
    t = Execute(["sh", "-c", "echo bad thing >&2; exit 4"], name="failing-one")
    with pytest.raises(ExecuteError) as ei:
        t.wait()
    msg = str(ei.value)
    assert "failing-one" in msg and "code 4" in msg and "bad thing" in msg
    with pytest.raises(ExecuteError):  # its outputs fail the same way
        Execute(["sh", "-c", "exit 1"], stdout=True).output.fetch()


def test_timeout_fails_the_task():
    with pytest.raises(ExecuteError, match="timed out"):
        Execute("sleep 20", timeout=0.5).wait(timeout=60)


def test_missing_declared_output_fails_naming_it():
    with pytest.raises(ExecuteError, match="'result.bin'"):
        Execute("true", output_paths=["result.bin"]).wait()


def test_symlink_output_escaping_refused():
    with pytest.raises(ExecuteError, match="outside"):
        Execute("ln -s /etc/hostname out", output_paths=["out"]).wait()


def test_env_and_shell():
    t = Execute("echo $GREETING-$((1+2))", shell=True, env={"GREETING": "hi"}, stdout=True)
    assert out(t) == "hi-3\n"


def test_python3_is_the_workers_interpreter():
    import sys

    t = Execute(["python3", "-c", "import sys, ray; print(sys.executable)"], stdout=True)
    assert Path(out(t).strip()).parent == Path(sys.executable).parent


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"args": ""}, "args is empty"),
        ({"args": []}, "args is empty"),
        ({"args": ["echo", 3]}, r"args\[1\] must be a string"),
        ({"args": 42}, "args must be a string or a list"),
        ({"args": "true", "output_paths": ["/abs/path"]}, "absolute"),
        ({"args": "true", "output_paths": ["../up"]}, "escapes"),
        ({"args": "true", "output_paths": "single-string"}, "not the string"),
        ({"args": "true", "output_paths": ["a", "a"]}, "duplicates"),
        ({"args": "true", "input_paths": {"/etc/x": None}}, "absolute"),
        ({"args": "true", "input_paths": {"x": "not data"}}, "must be a data object"),
        ({"args": "true", "stdin": b"raw bytes"}, "must be a data object"),
        ({"args": "true", "cpus": -1}, "cpus must be"),
        ({"args": "true", "timeout": 0}, "timeout must be"),
        ({"args": "true", "stdout": True, "output_paths": ["stdout"]}, "clashes"),
        ({"args": "true", "env": {"A": 1}}, "env must map"),
        ({"args": "true", "env": [("A", "B")]}, "env must map"),
        ({"args": "true", "env": {"A=B": "v"}}, "env: 'A=B'"),
        ({"args": "true", "env": {"": "v"}}, "env: ''"),
        ({"args": "true", "env": {"K": "a\0b"}}, "env: 'K'"),
        ({"args": "true", "timeout": float("nan")}, "timeout must be"),
        ({"args": "true", "timeout": float("inf")}, "timeout must be"),
        ({"args": "true", "output_paths": None}, "output_paths must be a list"),
        ({"args": "true", "input_paths": ["x"]}, "input_paths must"),
        ({"args": "true", "output_paths": ["o", "o/y"]}, "'o' is a directory of 'o/y'"),
        ({"args": [""]}, "the program to run is empty"),
        ({"args": ["", "x"]}, "the program to run is empty"),
        ({"args": "  ", "shell": True}, "the program to run is empty"),
        ({"args": ["a\0b"]}, r"args\[0\] contains a NUL byte"),
    ],
)
def test_bad_input_refused_before_running(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Execute(**kwargs)


def test_paths_that_are_both_file_and_directory_refused_before_running(ray_local):
    b = tasks.blob("x")
    for kwargs in (
        {"input_paths": {"a": b, "a/b": b}},
        {"input_paths": {"a": b}, "output_paths": ["a/b"]},
        {"input_paths": {"in/x": b}, "output_paths": ["in"]},
    ):
        with pytest.raises(ValueError, match="is a directory of"):
            Execute("true", **kwargs)


def test_a_data_objects_name_gives_its_file_a_suffix_not_shell_text(ray_local):
    """With shell=True a data object's file name is pasted into the command unquoted: only a plain
    suffix of its name may reach it."""
    evil = tasks.blob("hi\n", name="x.a;echo INJECTED;#")
    spaced = tasks.blob("ho\n", name="report.v1 final.txt")
    t = Execute(["cat", evil, spaced, "; echo $0"], shell=True, stdout=True)
    text = out(t)
    assert text.startswith("hi\nho\n") and "INJECTED" not in text, text
    named = Execute(["sh", "-c", 'echo "$1"', "sh", spaced], stdout=True)
    assert out(named).strip().endswith(".txt")  # the suffix a program may look at is kept


def test_program_run_repr_hides_the_environment():
    from pipeline.sandbox import ProgramRun

    assert "S3CRET" not in repr(ProgramRun(["true"], env={"TOKEN": "S3CRET"}))


def test_shared_input_materialised_once_per_node(ray_local):
    size = 3_000_000
    data = tasks.blob(os.urandom(size), "big.bin")
    ts = [Execute(["sh", "-c", 'wc -c < "$1"', "sh", data], stdout=True) for _ in range(8)]
    ray.get([t.info_ref for t in ts])
    infos = [t.wait() for t in ts]
    assert {out(t).strip() for t in ts} == {str(size)}
    assert sum(i.input_bytes_written for i in infos) == size  # written once, linked 7 times
    assert (ray_local / data.key).stat().st_size == size


def test_mapped_input_is_read_only_for_a_normal_user():
    if os.geteuid() == 0:
        t = Execute(["stat", "-c", "%a", tasks.blob("x")], stdout=True)
        assert out(t).strip() == "444"
    else:
        with pytest.raises(ExecuteError):
            Execute(["sh", "-c", 'echo y > "$1"', "sh", tasks.blob("x")]).wait()


def test_fetch_write_to_local_file(tmp_path):
    t = Execute("printf abc", stdout=True)
    p = t.output.fetch().write(tmp_path / "x.txt")
    assert p.read_bytes() == b"abc"
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError):
        t.output.fetch().write(tmp_path / "adir")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adir", "x.txt"]  # no temporary file left
    target = tmp_path / "target"
    target.write_text("keep")
    for pid in (os.getpid(), os.getpid() + 1):  # a link where a predictable temporary name would be
        (tmp_path / f".y.txt.tmp-{pid}").symlink_to(target)
    t.output.fetch().write(tmp_path / "y.txt")
    assert target.read_text() == "keep" and (tmp_path / "y.txt").read_bytes() == b"abc"


FAILING_WITH_OUTPUTS = """
import gc, time
from pipeline import tasks
t = tasks.Execute(["sh", "-c", "echo out; echo boom >&2; exit 3"], stdout=True, output_paths=["o.txt"])
try:
    t.wait()
except tasks.ExecuteError as e:
    print("caught:", str(e).splitlines()[0], flush=True)
del t
gc.collect()
time.sleep(2)  # Ray reports an unfetched error when the last reference to its object goes
tasks.stop_local_ray()
"""


def test_a_failed_task_whose_error_was_caught_does_not_report_its_outputs_unhandled():
    """wait() raised the task's error, so its outputs (holding the same error) are not Ray's 'unhandled
    errors' too: Ray would print the traceback again for each, when the task object goes."""
    from tests.conftest import run_cli

    r = run_cli("-c", FAILING_WITH_OUTPUTS, timeout=120, env={"RAY_ADDRESS": "", "PIPELINE_SANDBOX_DIR": ""})
    assert r.returncode == 0 and "caught: task 'sh -c" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "Unhandled error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]

"""The same command or file on many nodes at once, over SSH through Fabric, a result per node.

Partial failure is normal in a cluster: every call returns one NodeResult per node (the model is
Fabric's Group), and the caller decides. Host keys are pinned when first seen into the cluster's
known_hosts and checked on every later connection: a changed key is refused (never
StrictHostKeyChecking=no, never Fabric's default AutoAddPolicy).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut
from invoke.runners import Result

from cloud.fanout import parallel_map
from cloud.state import NodeRecord

log = logging.getLogger(__name__)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PGID_MARK = "RAYSWEEP_PGID"


def script(text: str) -> str:
    """A command running `text` in bash with `set -euo pipefail`: how every script the toolkit writes for a
    node runs (the user's own `cmd` text and setup_commands are run as given)."""
    return "bash -c " + shlex.quote("set -euo pipefail\n" + text)


def run_script(c: Connection, text: str, timeout: float | None = None) -> Result:
    """Run a toolkit script (see `script`) on one open connection, output captured, never raising on failure."""
    return c.run(script(text), hide=True, warn=True, in_stream=False, timeout=timeout)


def env_exports(env: Mapping[str, str]) -> str:
    """`export NAME='value' ... && `: each value quoted, so that it reaches the node's shell as one word,
    verbatim (Fabric's own inline env puts values in unquoted)."""
    if not env:
        return ""
    bad = [k for k in env if not _ENV_NAME.match(k)]
    if bad:
        raise ValueError(
            f"environment name(s) {', '.join(map(repr, bad))}: use letters, digits and '_', not first a digit"
        )
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " && "


@dataclass
class NodeResult:
    node: NodeRecord
    ok: bool
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # why it failed, when it did

    def summary(self) -> str:
        if self.ok:
            return "ok"
        return self.error or f"exit code {self.exit_code}"


class _PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Trust on first use: pin an unknown host's key into known_hosts (a changed one paramiko refuses)."""

    _lock = threading.Lock()

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        with self._lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        log.info("pinned host key of %s (%s)", hostname, key.get_name())


class _Lines(io.TextIOBase):
    """A stream that hands each whole line written to it to `handler` (the last partial line at finish())."""

    def __init__(self, handler: Callable[[str], None]):
        self.handler, self.buf = handler, ""

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.handler(line)
        return len(s)

    def flush(self) -> None:
        pass  # invoke flushes after every chunk; a partial line waits for its end or for finish()

    def finish(self) -> None:
        """Hand over what is left of the last line (output that did not end with a newline)."""
        if self.buf:
            self.handler(self.buf)
            self.buf = ""


_out_lock = threading.Lock()


def _failed(node: NodeRecord, r: Result, what: str) -> NodeResult:
    why = r.stderr.strip().splitlines()[-1:] or [f"exit code {r.exited}"]
    return NodeResult(node, False, r.exited, r.stdout, r.stderr, f"{what}: {why[0][:200]}")


def _pgid(stdout: str) -> int | None:
    first = stdout.split("\n", 1)[0].split()
    return int(first[1]) if len(first) == 2 and first[0] == _PGID_MARK and first[1].isdigit() else None


def _without_pgid(stdout: str) -> str:
    return stdout.split("\n", 1)[1] if stdout.startswith(_PGID_MARK) and "\n" in stdout else stdout


def _prefixed(prefix: str, out: TextIO) -> Callable[[str], None]:
    """A line handler writing to `out`, each line prefixed with the node's name (never interleaved)."""

    def write(line: str) -> None:
        with _out_lock:
            out.write(f"{prefix} | {line}\n")
            out.flush()

    return write


def _prefixed_lines(prefix: str, out: TextIO) -> _Lines:
    """Whole lines to `out`, each prefixed with the node's name (never interleaved within a line)."""
    return _Lines(_prefixed(prefix, out))


class Remote:
    """SSH access to a cluster's nodes with one key and one known_hosts file."""

    def __init__(self, key_path: Path, known_hosts: Path, connect_timeout: float = 10.0):
        self.key_path = Path(key_path)
        self.known_hosts = Path(known_hosts)
        self.connect_timeout = connect_timeout

    def connection(self, node: NodeRecord) -> Connection:
        cfg = Config(overrides={"load_ssh_configs": False, "run": {"warn": True}})
        conn = Connection(
            node.ip,
            user=node.user,
            config=cfg,
            connect_timeout=int(self.connect_timeout),
            connect_kwargs={
                "key_filename": str(self.key_path),
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": self.connect_timeout,
                "auth_timeout": self.connect_timeout,
            },
        )
        conn.client = paramiko.SSHClient()  # instead of Fabric's default AutoAddPolicy client
        if self.known_hosts.exists():
            conn.client.load_host_keys(str(self.known_hosts))
        conn.client.set_missing_host_key_policy(_PinOnFirstUse(self.known_hosts))
        return conn

    def _guarded(self, node: NodeRecord, fn: Callable[[NodeRecord], NodeResult]) -> NodeResult:
        """fn(node), whatever SSH raised turned into the node's failed result, saying what to do."""
        try:
            return fn(node)
        except paramiko.BadHostKeyException:
            return NodeResult(
                node,
                False,
                error=f"host key of {node.name} ({node.ip}) changed since it was "
                f"pinned in {self.known_hosts}; refused (possible "
                f"man-in-the-middle). If the node was really replaced, "
                f"run: exoscale.py forget-host {node.name}",
            )
        except paramiko.AuthenticationException as e:
            return NodeResult(node, False, error=f"SSH authentication as {node.user} failed: {e}")
        except (OSError, paramiko.SSHException, EOFError) as e:
            return NodeResult(
                node, False, error=f"cannot reach sshd at {node.ip}:22 ({type(e).__name__}: {e or 'no answer'})"
            )
        except Exception as e:
            return NodeResult(node, False, error=f"{type(e).__name__}: {e}")

    def _each(self, nodes: Sequence[NodeRecord], fn: Callable[[NodeRecord], NodeResult]) -> list[NodeResult]:
        return parallel_map(lambda node: self._guarded(node, fn), list(nodes))  # a result per node, never raises

    def run(
        self,
        nodes: Sequence[NodeRecord],
        command: str | Callable[[NodeRecord], str],
        sudo: bool = False,
        timeout: float | None = None,
        stream: TextIO | None = None,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[NodeRecord, str], None] | None = None,
    ) -> list[NodeResult]:
        """Run `command` (or command(node)) on every node in parallel; with `stream`, output lines are
        written there prefixed by node name; with `on_line`, each stdout line is handed to it. `env` values
        are quoted. After `timeout` seconds the command's process group on the node is stopped (sshd makes
        each command a session of its own, so the group is the command with everything it started)."""
        exports = env_exports(env or {})

        def one(node: NodeRecord) -> NodeResult:
            text = command(node) if callable(command) else command
            cmd = exports + (f"sudo -n sh -c {shlex.quote(text)}" if sudo else text)
            if timeout is not None:
                cmd = f'echo "{_PGID_MARK} $$"; {cmd}'
            handler: Callable[[str], None] | None = None
            err = None
            if stream:
                handler, err = _prefixed(node.name, stream), _prefixed_lines(node.name, stream)
            elif on_line:
                handler = lambda line: on_line(node, line)  # noqa: E731
            group: dict[str, int | bool] = {}

            def stdout_line(line: str) -> None:
                if "pgid" not in group and line.startswith(_PGID_MARK):
                    group["pgid"] = _pgid(line) or 0
                elif handler is not None:
                    handler(line)

            def expire() -> None:  # from a timer thread, over a connection of its own
                group["expired"] = True
                group["stopped"] = self._stop_group(node, int(group.get("pgid", 0)), sudo)

            out = _Lines(stdout_line)
            kwargs: dict = dict(hide=True, warn=True, in_stream=False, out_stream=out)
            if err:
                kwargs["err_stream"] = err
            timer = None
            if timeout is not None:
                # stopping the group ends the command; Fabric's own timeout only closes the channel (the
                # processes would go on), so it is the backstop for a node that stops answering
                kwargs["timeout"] = timeout + 30
                timer = threading.Timer(timeout, expire)
                timer.daemon = True
                timer.start()
            try:
                with self.connection(node) as c:
                    r = c.run(cmd, **kwargs)
                stdout, stderr, code = _without_pgid(r.stdout), r.stderr, r.exited
            except CommandTimedOut as e:
                stdout, stderr, code = _without_pgid(e.result.stdout), e.result.stderr, None
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join(60)  # when it fired: until the group is stopped
                for w in (out, err):
                    if w:
                        w.finish()
            if group.get("expired") or code is None:
                outcome = "its processes on the node were stopped" if group.get("stopped") else "it may still run"
                return NodeResult(node, False, code, stdout, stderr, f"timed out after {timeout:g} s; {outcome}")
            return NodeResult(node, code == 0, code, stdout, stderr, "" if code == 0 else f"exit code {code}")

        return self._each(nodes, one)

    def _stop_group(self, node: NodeRecord, pgid: int, sudo: bool) -> bool:
        """TERM a process group on the node, KILL what is left after 2 s; True when it is gone."""
        if pgid <= 1:
            return False
        kill = "sudo -n kill" if sudo else "kill"
        stop = (
            f"{kill} -TERM -- -{pgid} 2>/dev/null || exit 0\n"
            f"for _ in $(seq 20); do {kill} -0 -- -{pgid} 2>/dev/null || exit 0; sleep 0.1; done\n"
            f"{kill} -KILL -- -{pgid} 2>/dev/null || true"
        )
        try:
            with self.connection(node) as c:
                r = run_script(c, stop, timeout=30)
        except Exception as e:  # the node may be why it timed out
            log.warning("could not stop process group %s on %s: %s", pgid, node.name, e)
            return False
        return r.exited == 0

    def put(
        self, nodes: Sequence[NodeRecord], src: str | os.PathLike, dst: str, private: bool = False
    ) -> list[NodeResult]:
        """Copy a file or a directory (recursively) to every node; `dst` is relative to the login home.
        `private` (a file holding a secret): its directory is made 0700 (also when it was there) and the file
        is created 0600 before any byte is written; `src` should be 0600 too (its mode is copied)."""
        src = Path(src)
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or directory")
        if src.is_dir():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(src, arcname=".")
            payload = buf.getvalue()

        def one(node: NodeRecord) -> NodeResult:
            with self.connection(node) as c:
                c.open()  # a connection failure is "cannot reach sshd"; after this, errors are the node's files'
                try:
                    if src.is_dir():
                        tmp = f".raysweep-upload-{os.getpid()}-{threading.get_ident()}.tgz"
                        c.put(io.BytesIO(payload), tmp)
                        q = shlex.quote(dst)
                        r = run_script(c, f"trap 'rm -f {tmp}' EXIT\nmkdir -p {q}\ntar xzf {tmp} -C {q}")
                        if r.exited != 0:
                            return _failed(node, r, f"cannot unpack into {dst}")
                    else:
                        parent = os.path.dirname(dst.rstrip("/"))
                        prepare = f"mkdir -p {shlex.quote(parent)}" if parent else ""
                        if private:
                            d, q = shlex.quote(parent or "."), shlex.quote(dst)
                            prepare = f"umask 077 && mkdir -p {d} && chmod 700 {d} && rm -f {q} && : > {q}"
                        if prepare:
                            r = run_script(c, prepare)
                            if r.exited != 0:
                                return _failed(node, r, f"cannot create {dst if private else parent}")
                        c.put(str(src), dst)
                except OSError as e:
                    if c.transport is None or not c.transport.is_active():
                        raise  # the connection broke: _each reports it as such
                    return NodeResult(node, False, error=f"cannot write {dst} on {node.name}: {e.strerror or e}")
                return NodeResult(node, True, 0)

        return self._each(nodes, one)

    def wait_ssh_one(
        self, node: NodeRecord, timeout: float = 300.0, on_ready: Callable[[NodeRecord], None] | None = None
    ) -> NodeResult:
        """Wait, in this thread, until `node` answers a real SSH command (pinning its host key on first
        contact); a changed host key is a failed result saying so."""
        return self._guarded(node, lambda n: self._wait_ssh(n, timeout, on_ready))

    def _wait_ssh(self, node: NodeRecord, timeout: float, on_ready: Callable[[NodeRecord], None] | None) -> NodeResult:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((node.ip, 22), timeout=3):
                    pass
                with self.connection(node) as c:
                    r = c.run("true", hide=True, warn=True, in_stream=False, timeout=30)
                if r.exited == 0:
                    if on_ready:
                        on_ready(node)
                    return NodeResult(node, True, 0)
                last = f"exit code {r.exited}"
            except paramiko.BadHostKeyException:
                raise
            except (paramiko.SSHException, OSError, EOFError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1.0)
        return NodeResult(
            node, False, error=f"SSH on {node.name} ({node.ip}) did not answer within {timeout:g} s (last: {last})"
        )


def interactive_ssh_argv(node: NodeRecord, key_path: Path, known_hosts: Path, command: Sequence[str] = ()) -> list[str]:
    """argv for an interactive login with the system's OpenSSH client, checking the pinned host key."""
    return [
        "ssh",
        "-i",
        str(key_path),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        f"{node.user}@{node.ip}",
        *command,
    ]

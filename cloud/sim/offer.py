"""What the local Exoscale offers its hosts in place of the internet a real VM has.

- uv on the hosts' PATH: this machine's uv (the one beside the running Python, as the venv installs it),
  laid over /usr/local/bin in each host's own mount namespace (an overlay: nothing changes on this machine).
- A package index: the packages nodes install (and the head's node provider needs), fetched once on this machine (`pip download` into
  wheelhouse_dir()) and served as a PEP 503 simple index over HTTP on the hosts' bridge gateway.
- uv configured system-wide on the host (a private /etc/uv/uv.toml, overlaid likewise): that index as the
  only one, `link-mode = "copy"`, a cache directory shared by the hosts of this run and removed with the run
  (uv keys its cache by index URL, and each run's index has its own port: a cache kept across runs would grow
  by the nodes' unpacked packages, about 2 GB, every run), no Python downloads.

With these, `exoscale.py install` runs on a host exactly as on a real VM, with no cluster.toml.
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from cloud.node_install import head_packages, node_packages
from cloud.sim.paths import wheelhouse_dir
from pipeline.requirements import NODE_PACKAGES

if TYPE_CHECKING:
    from cloud.sim.hosts import HostHooks

log = logging.getLogger(__name__)

STAMP = ".offered"  # the set of packages a complete wheelhouse holds, one per line


def offered_packages() -> list[str]:
    """Every package a node of this project may install, pinned to this machine's versions: Ray and the
    training program's packages (what `install` puts on every node) and the head's (the node provider's and
    the autostop daemon's). The head's set holds the workers', so this one list serves both. The sim stands
    in for the internet, so it has to know what will be asked of it."""
    return node_packages([*NODE_PACKAGES, *head_packages()])


def _failed_requirements(pip_stderr: str) -> list[str]:
    """The requirements pip names as the ones it could not get."""
    found = re.findall(r"No matching distribution found for (\S+)", pip_stderr)
    return list(dict.fromkeys(found))


def fill_wheelhouse(packages: list[str] | None = None, wheelhouse: Path | None = None, timeout: float = 1800) -> Path:
    """Make `wheelhouse` (default: wheelhouse_dir()) hold `packages` (default: offered_packages()) and their
    dependencies, downloading what is missing with `pip download`. One stamp records the set a complete
    wheelhouse holds; a wheelhouse whose stamp is missing or names another set is completed, under a lock
    (test sessions and `make sim` may fill it at once). RuntimeError naming the package pip could not get, and
    pip's reason, when the download fails."""
    packages = offered_packages() if packages is None else packages
    wheelhouse = wheelhouse_dir() if wheelhouse is None else wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    stamp = wheelhouse / STAMP
    want = "\n".join(sorted(packages))
    with open(wheelhouse / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == want:
            return wheelhouse
        log.info("fetching the hosts' packages into %s (once per machine)", wheelhouse)
        stamp.unlink(missing_ok=True)  # not complete until the download is
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheelhouse), *packages],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            failed = _failed_requirements(r.stderr)
            what = f"no {', '.join(failed)} on the package index" if failed else "pip download failed"
            reason = " ".join(r.stderr.strip().splitlines()[-2:])[-400:]
            raise RuntimeError(
                f"cannot fetch the hosts' packages into {wheelhouse}: {what} ({reason}); "
                "python -m cloud.sim api --hosts --no-packages starts without them"
            )
        tmp = stamp.with_name(f"{STAMP}.{os.getpid()}")
        tmp.write_text(want)
        os.replace(tmp, stamp)
    return wheelhouse


def project_name(filename: str) -> str | None:
    """The PEP 503 normalized project name of a wheel or sdist file name, or None for other files."""
    if filename.endswith(".whl"):
        name = filename.split("-")[0]
    else:
        m = re.match(r"^(.+)-\d[^-]*\.(tar\.gz|zip|tar\.bz2)$", filename)
        if not m:
            return None
        name = m.group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


class PackageIndex:
    """A PEP 503 simple index of the files in one directory, served over HTTP on a thread."""

    def __init__(self, directory: Path, host: str, port: int = 0):
        self.directory = directory
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        index = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                index._serve(self, with_body=True)

            def do_HEAD(self) -> None:
                index._serve(self, with_body=False)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("index: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sim-package-index", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/simple/"

    def _sha256(self, path: Path) -> str:
        key = f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        with self._lock:
            if key not in self._hashes:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                self._hashes[key] = h.hexdigest()
            return self._hashes[key]

    def _projects(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for p in sorted(self.directory.iterdir()):
            name = project_name(p.name) if p.is_file() else None
            if name:
                out.setdefault(name, []).append(p)
        return out

    def _serve(self, req: BaseHTTPRequestHandler, with_body: bool) -> None:
        path = unquote(req.path.split("?")[0])
        parts = [p for p in path.split("/") if p]
        if parts == ["simple"]:
            links = "".join(f'<a href="/simple/{n}/">{n}</a>\n' for n in self._projects())
            return self._send(req, 200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode(), with_body)
        if len(parts) == 2 and parts[0] == "simple":
            files = self._projects().get(re.sub(r"[-_.]+", "-", parts[1]).lower())
            if not files:
                return self._send(req, 404, b"not found\n", with_body)
            links = "".join(
                f'<a href="/files/{html.escape(p.name)}#sha256={self._sha256(p)}">{html.escape(p.name)}</a>\n'
                for p in files
            )
            return self._send(req, 200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode(), with_body)
        if len(parts) == 2 and parts[0] == "files" and "/" not in parts[1] and project_name(parts[1]):
            file = self.directory / parts[1]
            if file.is_file():
                self._send_file(req, file, with_body)
                return None
        return self._send(req, 404, b"not found\n", with_body)

    @staticmethod
    def _send_file(req: BaseHTTPRequestHandler, file: Path, with_body: bool) -> None:
        """The file, or the one byte range asked for (uv reads a wheel's metadata from its end)."""
        size = file.stat().st_size
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("Range", "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
            else:
                start = max(size - int(m.group(2)), 0)
            if start > end:
                req.send_response(416)
                req.send_header("Content-Range", f"bytes */{size}")
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            req.send_response(206)
            req.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(end - start + 1))
        req.end_headers()
        if not with_body:
            return
        try:
            with open(file, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    req.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("index: %s closed the connection during %s", req.client_address[0], file.name)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, with_body: bool) -> None:
        req.send_response(status)
        req.send_header("Content-Type", "text/html" if status == 200 else "text/plain")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if with_body:
            req.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def uv_binary() -> Path:
    """This machine's uv: beside the running Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = beside if beside.exists() else (Path(shutil.which("uv") or ""))
    if not found.is_file():
        raise RuntimeError("no uv beside this Python or on PATH to offer the hosts (pip install uv)")
    return found


def uv_config(index_url: str, cache_dir: Path) -> str:
    return (
        "# offered by the local Exoscale: its package index instead of the internet\n"
        f'index-url = "{index_url}"\n'
        'link-mode = "copy"\n'
        f'cache-dir = "{cache_dir}"\n'
        'python-downloads = "never"\n'
    )


@dataclass
class HostOffer:
    """The files laid over each host's /usr/local/bin and /etc (directory `root`), and the package index."""

    root: Path
    index: PackageIndex

    @classmethod
    def start(cls, hooks: HostHooks, packages: list[str] | None = None) -> HostOffer:
        wheelhouse = fill_wheelhouse(packages)
        cache = hooks.run_dir / "uv-cache"  # removed with the run's directory, also by a later run if this one dies
        cache.mkdir(exist_ok=True)
        os.chmod(cache, 0o1777)  # shared by the hosts' login users, like a system cache dir
        root = hooks.run_dir / "offer"
        (root / "bin").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "uv").mkdir(parents=True, exist_ok=True)
        shutil.copy2(uv_binary(), root / "bin" / "uv")
        index = PackageIndex(wheelhouse, hooks.gateway)
        (root / "etc" / "uv" / "uv.toml").write_text(uv_config(index.url, cache))
        hooks.offer_dir = root
        log.info("hosts offered uv and the package index %s (%s)", index.url, wheelhouse)
        return cls(root, index)

    def close(self) -> None:
        self.index.close()

"""The local cache of what `up` made: nodes, their addresses and roles, the SSH key, pinned host keys.

The Exoscale API is the source of truth (provision.py finds everything by label and name); this
cache lets scp/cmd/ssh work without an API call and keeps the host keys pinned on first contact.
Layout of a cluster's state directory (mode 700):
    state.json      nodes and cluster resources
    id_ed25519(.pub) the cluster's own key pair, when no ssh_key is configured (private key 600)
    ssh_key_path    the private key given to import-terraform, for a Terraform-made cluster
    known_hosts     host keys pinned when first seen, checked on every later connection
    lock            held by the command changing the cluster (`up`, `down`), naming its process
    autostop.json   the autostop setting last given to the head from here ({"minutes": M}; 0 = off): what
                    tells an autostop from instances deleted by someone else once the head is gone
    zone            the zone of cluster.toml's `zones` the cluster's first node was made in (where it lives)
The default root ~/.raysweep/clusters and ~/.raysweep are the toolkit's own and kept at mode 700 too.
    ray_token       the cluster's Ray token (600), made by `start`, sent to the nodes and to Ray's clients
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ClusterBusy(Exception):
    """Another process holds the cluster's lock; the message names it."""


def toolkit_dirs() -> list[Path]:
    """The directories the toolkit makes for itself in the home directory (mode 700)."""
    home = Path.home() / ".raysweep"
    return [home, home / "clusters"]


class NoHeadError(Exception):
    """The cluster's state has no head node (e.g. a Terraform output of workers only)."""


@dataclass
class NodeRecord:
    name: str
    role: str  # head or worker
    ip: str
    id: str = ""
    user: str = "ubuntu"
    state: str = ""


@dataclass
class ClusterState:
    name: str
    nodes: list[NodeRecord] = field(default_factory=list)
    security_group_id: str = ""
    key_name: str = ""

    def head(self) -> NodeRecord | None:
        return next((n for n in self.nodes if n.role == "head"), None)

    def require_head(self) -> NodeRecord:
        """The head node, or NoHeadError naming the cluster and the nodes it has."""
        head = self.head()
        if head is None:
            names = ", ".join(n.name for n in self.ordered()) or "none"
            raise NoHeadError(
                f"cluster {self.name!r} has no head node (its nodes: {names}); Ray needs one node with "
                f"role head: run `exoscale.py up` to complete the cluster, or import a Terraform output that has one"
            )
        return head

    def ordered(self) -> list[NodeRecord]:
        """Head first, then workers by name: the numbering `ssh N` and `--node N` use."""
        return sorted(self.nodes, key=lambda n: (n.role != "head", _natural(n.name)))


def _natural(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class StateStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory)

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def key_path(self) -> Path:
        return self.dir / "id_ed25519"

    def private_key(self, configured: Path | None = None) -> Path:
        """The key SSH uses for this cluster: the configured ssh_key, else the one recorded by
        import-terraform, else the cluster's own key pair."""
        if configured:
            return configured
        imported = self.dir / "ssh_key_path"
        if imported.exists():
            return Path(imported.read_text().strip())
        return self.key_path

    @property
    def ray_token_path(self) -> Path:
        return self.dir / "ray_token"

    def ray_token(self) -> str | None:
        """The cluster's Ray token, or None before `start` made it."""
        try:
            return self.ray_token_path.read_text().strip()
        except FileNotFoundError:
            return None

    def ensure_ray_token(self) -> str:
        """The cluster's Ray token, made on first use in a file only the user can read."""
        self.ensure_dir()
        try:
            fd = os.open(self.ray_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return self.ray_token_path.read_text().strip()

    @property
    def autostop_path(self) -> Path:
        return self.dir / "autostop.json"

    def record_autostop(self, minutes: float) -> None:
        """Remember the autostop setting the head was given (0 = off)."""
        self.ensure_dir()
        tmp = self.autostop_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"minutes": minutes}) + "\n")
        os.replace(tmp, self.autostop_path)

    def autostop_record(self) -> float | None:
        """The autostop setting last given to the head from this machine, or None when none was recorded."""
        try:
            minutes = json.loads(self.autostop_path.read_text())["minutes"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return float(minutes) if isinstance(minutes, (int, float)) and not isinstance(minutes, bool) else None

    @property
    def zone_path(self) -> Path:
        return self.dir / "zone"

    def record_zone(self, zone: str) -> None:
        """Remember the zone the cluster's first node was made in (of cluster.toml's `zones`)."""
        self.ensure_dir()
        self.zone_path.write_text(zone + "\n")

    def zone_record(self) -> str | None:
        try:
            return self.zone_path.read_text().strip() or None
        except OSError:
            return None

    def record_imported_key(self, path: Path) -> None:
        self.ensure_dir()
        (self.dir / "ssh_key_path").write_text(str(path.resolve()) + "\n")

    def ensure_dir(self) -> None:
        """The cluster's directory, mode 700, and any parent it needs made 700 too. The toolkit's own
        ~/.raysweep and ~/.raysweep/clusters are set to 700 even when an earlier version made them 755;
        a directory of the user's own (e.g. $RAYSWEEP_STATE_DIR) is never changed."""
        missing = [p for p in [*reversed(self.dir.parents), self.dir] if not p.exists()]
        for p in missing:
            with contextlib.suppress(FileExistsError):
                p.mkdir(mode=0o700)
        own = [d for d in toolkit_dirs() if self.dir.is_relative_to(d)]
        for p in [*own, self.dir]:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o700)

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the cluster's lock for `command`; raise ClusterBusy naming the holder if another has it.
        The lock is the kernel's (flock), so a crashed holder never leaves it stuck."""
        self.ensure_dir()
        path = self.dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
                raise ClusterBusy(
                    f"cluster {self.dir.name!r} is being changed by {holder}; wait until it ends (or stop it), "
                    f"then run this again"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})".encode(), 0)
            yield
        finally:
            os.close(fd)

    def load(self) -> ClusterState | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        nodes = [NodeRecord(**n) for n in data.pop("nodes", [])]
        known = {f.name for f in fields(ClusterState)}
        return ClusterState(
            nodes=nodes, **{k: v for k, v in data.items() if k in known}
        )  # keys it does not know are left out

    def save(self, state: ClusterState) -> None:
        self.ensure_dir()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        os.replace(tmp, self.path)

    def ensure_key(self) -> Path:
        """The cluster's own ed25519 key pair, made on first use; the private key is readable by the user only."""
        self.ensure_dir()
        if not self.key_path.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"raysweep-{self.dir.name}",
                    "-f",
                    str(self.key_path),
                ],
                check=True,
            )
        os.chmod(self.key_path, 0o600)
        return self.key_path

    def forget_host(self, ip: str) -> None:
        if self.known_hosts.exists():
            lines = [l for l in self.known_hosts.read_text().splitlines() if l.split(" ", 1)[0] != ip]
            self.known_hosts.write_text("".join(l + "\n" for l in lines))

    def remove(self, keep_key: bool = False) -> None:
        if not self.dir.exists():
            return
        if keep_key:
            for p in (self.path, self.known_hosts, self.autostop_path, self.zone_path):
                p.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.dir)

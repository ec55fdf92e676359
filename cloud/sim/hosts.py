"""Simulated instances as local hosts: one network namespace per instance, reachable over SSH.

Each running instance gets:
- a network namespace with a veth on a bridge private to this sim run; the instance's public IP is
  its address there, and this machine reaches it through the bridge (nothing else can);
- its own PID, mount and UTS namespaces (so `ray stop` on one host sees only that host), and a root
  of its own: of this machine only the OS (/usr and /etc read-only, /dev, /sys) and the few paths of
  MACHINE_PATHS (the package offer; uv caches), with private, empty /root, /home, /tmp, /var, /run,
  /dev/shm and its own terminals (devpts), and private copies of /etc/passwd, shadow, group and
  sudoers.d bound over the originals. The host's root is this machine's root (no user namespace): this
  keeps the machine's and other clusters' files (keys, API credentials under /root) out of a host's view
  and reach, not out of the hands of a root on the host who goes for the disk through /dev;
- a login user `ubuntu` (the template's default user) with passwordless sudo, whose
  authorized_keys are the instance's registered SSH keys, and sshd with host keys of its own;
- an nftables input policy built from its security groups' ingress rules (default drop, as on
  Exoscale), re-applied whenever rules or group membership change;
- when the run offers them (cloud.sim.offer), uv and a uv configuration laid read-only over the host's
  /usr/local/bin and /etc: what the internet gives a real VM.

Stopping or destroying the instance ends its PID namespace; destroying also removes its network
namespace. Every run records itself under /run/exoscale-sim; the leftovers of a run whose process
is gone are cleaned when the next one starts. Needs root, iproute2, nftables, openssh-server, sudo.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud.sim.model import Instance, InstanceHooks, Model
from cloud.sim.paths import wheelhouse_dir

log = logging.getLogger(__name__)

RUN_ROOT = Path("/run/exoscale-sim")
LOGIN_UID = 1500  # uid 1000 is taken on these machines
PREFIX = "exs"


def missing_requirements() -> list[str]:
    """What this machine lacks to run hosts (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool, path in (
        ("ip", "/usr/sbin/ip"),
        ("nft", "/usr/sbin/nft"),
        ("sshd", "/usr/sbin/sshd"),
        ("unshare", "/usr/bin/unshare"),
        ("sudo", "/usr/bin/sudo"),
        ("ssh-keygen", "/usr/bin/ssh-keygen"),
    ):
        if not (shutil.which(tool) or os.path.exists(path)):
            missing.append(tool)
    return missing


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """A subnet for the hosts' bridge: IPv4, private, from /16 to /29; ValueError saying what is valid."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"--subnet {text!r}: {e}; expected an IPv4 network such as 10.77.5.0/24") from None
    if not isinstance(net, ipaddress.IPv4Network) or not net.is_private or not 16 <= net.prefixlen <= 29:
        raise ValueError(f"--subnet {text!r}: expected a private IPv4 network from /16 to /29, e.g. 10.77.5.0/24")
    return net


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[:400]}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def clean_stale_runs() -> int:
    """Remove namespaces, interfaces and processes of sim runs whose owner process is gone."""
    cleaned = 0
    if not RUN_ROOT.exists():
        return 0
    for run_dir in RUN_ROOT.iterdir():
        try:
            meta = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        if _pid_alive(meta["owner_pid"]):
            continue
        log.info("cleaning stale sim run %s", meta["run_id"])
        _teardown_run(meta["run_id"], run_dir)
        cleaned += 1
    return cleaned


def _teardown_run(run_id: str, run_dir: Path) -> None:
    for pidfile in run_dir.glob("*.pid"):
        try:
            pid = int(pidfile.read_text())
            os.killpg(pid, signal.SIGKILL)
        except (ValueError, OSError):
            pass
    for ns in _run("ip", "netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(f"{PREFIX}-{run_id}-"):
            _run("ip", "netns", "delete", name, check=False)
    _run("ip", "link", "delete", f"{PREFIX}br{run_id}", check=False)
    shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Host:
    index: int
    ip: str
    netns: str
    veth: str
    proc: subprocess.Popen | None = None
    boot_thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


#: MACHINE_PATHS, what a host sees of this machine besides its OS (/usr and /etc read-only, the /bin, /sbin and /lib* links,
#: /dev, /sys): paths or glob patterns, each with whether the host may write there. The package offer
#: (the wheels and the uv that tests give nodes) read-only, and the uv caches that the hosts of a test session
#: share, read-write; those there when a host boots. Also, per run, its own uv cache (cloud.sim.offer),
#: read-write. Nothing else: the host's /root, /home, /tmp, /var, /run, /dev/shm, /mnt, /media, /srv and
#: /opt are its own, empty at boot.
def machine_paths() -> tuple[tuple[str, bool], ...]:
    """MACHINE_PATHS: the offered wheelhouse (wherever RAYSWEEP_WHEELHOUSE puts it) and the test sessions'
    uv caches."""
    return ((str(wheelhouse_dir()), False), ("/var/tmp/raysweep-test-uv-*", True))


# The host's pid 1: a root of its own (the OS and MACHINE_PATHS of this machine, the rest private), users,
# host keys, sshd; then it waits, reaping orphans.
BOOT_SCRIPT = r"""
set -e
hostname "$HOST_NAME"
R=$NEW_ROOT
mount -t tmpfs -o mode=755 tmpfs "$R"
bind() { mkdir -p "$R$1"; mount --rbind "$1" "$R$1"; if [ "$2" = ro ]; then mount -o remount,bind,ro "$R$1"; fi; }
private() { mkdir -p -m "$2" "$R$1"; mount -t tmpfs -o "mode=$2" tmpfs "$R$1"; }
bind /usr ro
bind /etc ro
for d in /bin /sbin /lib /lib32 /lib64 /libx32; do
  if [ -L $d ]; then cp -P $d "$R$d"; elif [ -d $d ]; then bind $d ro; fi
done
if [ -n "$OFFER_DIR" ]; then
  # what the internet gives a real VM: uv on PATH, uv configured for the sim's package index (read-only overlays)
  mount -t overlay overlay -o "lowerdir=$OFFER_DIR/bin:/usr/local/bin" "$R/usr/local/bin"
  mount -t overlay overlay -o "lowerdir=$OFFER_DIR/etc:/etc" "$R/etc"
fi
bind /dev rw
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"  # its own terminals, not the machine's
mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
bind /sys ro
mkdir "$R/proc"
mount -t proc proc "$R/proc"
private /dev/shm 1777
private /tmp 1777
private /root 700
private /home 755
private /run 755
private /var 755
mkdir -m 1777 "$R/run/lock" "$R/var/tmp"
mkdir "$R/var/lib" "$R/var/log" "$R/var/cache" "$R/var/spool" "$R/mnt" "$R/media" "$R/srv" "$R/opt"
ln -s /run "$R/var/run"
ln -s /run/lock "$R/var/lock"
for p in $SHARE_RO; do bind "$p" ro; done
for p in $SHARE_RW; do bind "$p" rw; done
cd "$R"
mkdir .machine
pivot_root . .machine
cd /
umount -l /.machine
rmdir /.machine
P=/home/.host
mkdir -m 700 $P
cp /etc/passwd /etc/shadow /etc/group /etc/hosts $P/
echo "$HOST_IP $HOST_NAME" >> $P/hosts
echo "$LOGIN_USER:x:$LOGIN_UID:$LOGIN_UID:$LOGIN_USER:/home/$LOGIN_USER:/bin/bash" >> $P/passwd
echo "$LOGIN_USER:*:19000:0:99999:7:::" >> $P/shadow
echo "$LOGIN_USER:x:$LOGIN_UID:" >> $P/group
mkdir -m 755 $P/sudoers.d
echo "$LOGIN_USER ALL=(ALL) NOPASSWD:ALL" > $P/sudoers.d/90-cloud-init-users
chmod 440 $P/sudoers.d/90-cloud-init-users
for f in passwd shadow group hosts; do mount --bind $P/$f /etc/$f; done
mount --bind $P/sudoers.d /etc/sudoers.d
mkdir -p -m 700 /home/$LOGIN_USER/.ssh
printf '%s\n' "$AUTHORIZED_KEYS" > /home/$LOGIN_USER/.ssh/authorized_keys
chmod 600 /home/$LOGIN_USER/.ssh/authorized_keys
chown -R $LOGIN_UID:$LOGIN_UID /home/$LOGIN_USER
ssh-keygen -q -t ed25519 -N '' -f $P/ssh_host_ed25519_key
cat > $P/sshd_config <<EOF
ListenAddress $HOST_IP:22
HostKey $P/ssh_host_ed25519_key
PidFile $P/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes yes
Subsystem sftp internal-sftp
AcceptEnv LANG LC_*
MaxStartups 100:30:200
MaxSessions 50
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -f $P/sshd_config -E $P/sshd.log
trap 'exit 0' TERM
while :; do sleep 3600 & wait $! || true; done
"""


class HostHooks(InstanceHooks):
    """Boots each running instance as a namespace host; see the module docstring."""

    def __init__(self, run_id: str, subnet: ipaddress.IPv4Network):
        self.run_id = run_id
        self.subnet = subnet
        self.gateway = str(next(subnet.hosts()))
        self.bridge = f"{PREFIX}br{run_id}"
        self.run_dir = RUN_ROOT / run_id
        self.model: Model | None = None
        self.offer_dir: Path | None = None  # laid over the hosts' /usr/local/bin and /etc (cloud.sim.offer)
        self.hosts: dict[str, Host] = {}  # instance id -> host
        self._free = [str(ip) for ip in list(subnet.hosts())[1:]]
        self._next_index = 0
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def create(cls, subnet: str | None = None) -> HostHooks:
        """A new run: its bridge on `subnet` (an IPv4 /16../29 CIDR; default: a free 10.77.x.0/24)."""
        missing = missing_requirements()
        if missing:
            raise RuntimeError(
                f"local VM hosts need {', '.join(missing)}; run as root with iproute2, nftables, "
                f"openssh-server and sudo installed (make test installs them)"
            )
        clean_stale_runs()
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        used = {
            ipaddress.ip_network(r.split()[0], strict=False)
            for r in _run("ip", "-4", "route", "show").stdout.splitlines()
            if r and r.split()[0][0].isdigit()
        }
        run_id = next(
            (i for i in (f"{random.randrange(16**4):04x}" for _ in range(100)) if not (RUN_ROOT / i).exists()), None
        )
        if run_id is None:
            raise RuntimeError(f"no free run id under {RUN_ROOT}")
        if subnet is not None:
            net = parse_subnet(subnet)
            clash = [str(u) for u in used if net.overlaps(u)]
            if clash:
                raise RuntimeError(f"subnet {net} overlaps a route of this machine ({', '.join(clash)}); pick another")
        else:
            for _ in range(100):
                net = ipaddress.IPv4Network(f"10.77.{random.randrange(1, 255)}.0/24")
                if not any(net.overlaps(u) for u in used):
                    break
            else:
                raise RuntimeError("no free 10.77.x.0/24 subnet for the sim's bridge; pass one with --subnet")
        subnet_net = net
        self = cls(run_id, subnet_net)
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "run.json").write_text(
            json.dumps({"run_id": run_id, "owner_pid": os.getpid(), "subnet": str(subnet_net)})
        )
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/{subnet_net.prefixlen}", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
        except RuntimeError:
            _teardown_run(run_id, self.run_dir)
            raise
        log.info("sim hosts on %s (bridge %s)", subnet_net, self.bridge)
        return self

    def attach(self, model: Model) -> None:
        self.model = model
        model.hooks = self

    def _model(self) -> Model:
        if self.model is None:
            raise RuntimeError("HostHooks.attach(model) was not called")
        return self.model

    # --------------------------------------------------------------------------- model hooks
    def allocate_ip(self, instance: Instance) -> str | None:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"the sim's host subnet {self.subnet} is full")
            ip = self._free.pop(0)
            idx = self._next_index
            self._next_index += 1
            ns = f"{PREFIX}-{self.run_id}-{idx}"
            self.hosts[instance.id] = Host(idx, ip, ns, f"{PREFIX}v{self.run_id}{idx}")
            return ip

    def on_running(self, instance: Instance) -> None:
        host = self.hosts.get(instance.id)
        if host is None or self._closed:
            return
        model = self._model()
        keys = "\n".join(model.ssh_keys[k].public_key for k in instance.ssh_keys if k in model.ssh_keys)
        user = instance.template.default_user
        firewall = self._firewalls()

        def boot():
            with host.lock:
                try:
                    self._ensure_netns(host)
                    if host.proc is None or host.proc.poll() is not None:
                        self._boot(host, instance.name, user, keys)
                except Exception as e:
                    log.error("host for %s failed to boot: %s", instance.name, e)
            self._apply_firewalls(firewall)

        host.boot_thread = threading.Thread(target=boot, name=f"boot-{instance.name}", daemon=True)
        host.boot_thread.start()

    def on_stopped(self, instance: Instance) -> None:
        host = self.hosts.get(instance.id)
        if host is not None:
            self._stop(host)

    def on_destroyed(self, instance: Instance) -> None:
        with self._lock:
            host = self.hosts.pop(instance.id, None)
        if host is None:
            return
        firewall = self._firewalls()

        def destroy():
            if host.boot_thread is not None:
                host.boot_thread.join(30)
            self._stop(host)
            _run("ip", "netns", "delete", host.netns, check=False)
            with self._lock:
                self._free.append(host.ip)
            self._apply_firewalls(firewall)

        threading.Thread(target=destroy, name=f"destroy-{instance.name}", daemon=True).start()

    # ------------------------------------------------------------------------------- plumbing
    def _ensure_netns(self, host: Host) -> None:
        if os.path.exists(f"/run/netns/{host.netns}"):
            return
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
        ns = ("ip", "netns", "exec", host.netns)
        _run(*ns, "ip", "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _run(*ns, "ip", "link", "set", "eth0", "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "route", "add", "default", "via", self.gateway)

    def _shared_paths(self) -> tuple[list[str], list[str]]:
        """MACHINE_PATHS as they are now (read-only, read-write), and this run's uv cache when offered."""
        ro: list[str] = []
        rw: list[str] = []
        for pattern, writable in machine_paths():
            for path in sorted(glob.glob(pattern)):
                if os.path.isdir(path) and not os.path.islink(path) and " " not in path:
                    (rw if writable else ro).append(path)
        if (self.run_dir / "uv-cache").is_dir():
            rw.append(str(self.run_dir / "uv-cache"))
        return ro, rw

    def _boot(self, host: Host, name: str, user: str, keys: str) -> None:
        new_root = self.run_dir / f"host-{host.index}.root"  # an empty directory here; its mounts are the host's
        new_root.mkdir(mode=0o700, exist_ok=True)
        share_ro, share_rw = self._shared_paths()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOST_NAME": name,
            "HOST_IP": host.ip,
            "LOGIN_USER": user,
            "LOGIN_UID": str(LOGIN_UID),
            "AUTHORIZED_KEYS": keys,
            "OFFER_DIR": str(self.offer_dir or ""),
            "NEW_ROOT": str(new_root),
            "SHARE_RO": " ".join(share_ro),
            "SHARE_RW": " ".join(share_rw),
        }
        logf = open(self.run_dir / f"host-{host.index}.log", "ab")
        host.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--uts",
                "--mount-proc",
                "--propagation",
                "private",
                "bash",
                "-c",
                BOOT_SCRIPT,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        (self.run_dir / f"host-{host.index}.pid").write_text(str(host.proc.pid))

    def _stop(self, host: Host) -> None:
        with host.lock:
            if host.proc is not None and host.proc.poll() is None:
                try:
                    os.killpg(host.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                host.proc.wait(10)
            host.proc = None
            (self.run_dir / f"host-{host.index}.pid").unlink(missing_ok=True)

    def _firewalls(self) -> dict[str, str]:
        """nftables rulesets per network namespace, from the model's current groups and members."""
        m = self._model()
        members: dict[str, list[str]] = {}
        for inst in m.instances.values():
            h = self.hosts.get(inst.id)
            if h is not None and inst.state not in ("destroying", "destroyed"):
                for gid in inst.security_group_ids:
                    members.setdefault(gid, []).append(h.ip)
        out = {}
        for inst in m.instances.values():
            h = self.hosts.get(inst.id)
            if h is None:
                continue
            lines = [
                "table inet exoscale",
                "delete table inet exoscale",
                "table inet exoscale {",
                "  chain input {",
                "    type filter hook input priority 0; policy drop;",
                "    ct state established,related accept",
                "    iif lo accept",
            ]
            for gid in inst.security_group_ids:
                g = m.security_groups.get(gid)
                for r in g.rules if g else []:
                    if r.flow_direction != "ingress":
                        continue
                    if r.network is not None:
                        net = ipaddress.ip_network(r.network, strict=False)
                        if net.version != 4:
                            continue
                        sources = [str(net)]
                    else:
                        sources = members.get(r.security_group_id or "", [])
                    for src in sources:
                        lines.append("    " + _nft_rule(src, r.protocol, r.start_port, r.end_port))
            lines += ["  }", "}"]
            out[h.netns] = "\n".join(lines) + "\n"
        return out

    def _apply_firewalls(self, rulesets: dict[str, str]) -> None:
        for netns, text in rulesets.items():
            if os.path.exists(f"/run/netns/{netns}"):
                r = _run("ip", "netns", "exec", netns, "nft", "-f", "-", input=text, check=False)
                if r.returncode != 0 and os.path.exists(f"/run/netns/{netns}"):  # not just torn down meanwhile
                    log.error("nft in %s failed: %s", netns, r.stderr.strip())

    def wait_ssh(self, ip: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((ip, 22), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"sshd on sim host {ip} did not answer within {timeout:g} s")

    def close(self) -> None:
        """Stop every host and remove this run's namespaces, bridge and records."""
        self._closed = True
        with self._lock:
            hosts = list(self.hosts.values())
            self.hosts.clear()
        for h in hosts:
            if h.boot_thread is not None:
                h.boot_thread.join(30)
            self._stop(h)
        _teardown_run(self.run_id, self.run_dir)


def _nft_rule(src: str, protocol: str, start: int | None, end: int | None) -> str:
    base = f"ip saddr {src}"
    if protocol in ("tcp", "udp"):
        ports = f"{start}" if start == end else f"{start}-{end}"
        return f"{base} {protocol} dport {ports} accept"
    if protocol == "icmp":
        return f"{base} ip protocol icmp accept"
    if protocol == "all":
        return f"{base} accept"
    return f"{base} ip protocol {protocol} accept"

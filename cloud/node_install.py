"""`install`: a Python environment in ~/raysweep-env on every node with exactly this machine's Python minor
version and Ray version, plus the packages cluster.toml names (`packages`; `exoscale.py` supplies the
training program's as the default), each pinned to the version here where this machine has it; the head
also gets HEAD_PACKAGES (the autostop daemon's, as for the autoscaler's head in cloud.ray_config).

Through uv: one already on the node's PATH (an image with a mirror configured in /etc/uv/uv.toml), else
`uv_path`, else uv's installer from the internet; uv also installs the Python where the template's differs.
Idempotent: a node whose environment has these versions and packages is left alone. The script stops at the
first failing step with one line naming the step and the URL it needed.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from cloud import access
from cloud.config import ClusterConfig, ConfigError
from cloud.remote import NodeResult, Remote, env_exports, script
from cloud.state import NodeRecord

log = logging.getLogger(__name__)

NODE_ENV = "raysweep-env"  # relative to the login user's home
UV_INSTALLER = "https://astral.sh/uv/install.sh"
PYTHON_DOWNLOADS = "https://github.com/astral-sh/python-build-standalone/releases"
DEFAULT_INDEX = "https://pypi.org/simple"
OFFLINE_HINT = (
    "for nodes without internet set uv_path (a uv binary on the nodes) and install_options "
    '(e.g. "--index-url https://mirror.example/simple") in cluster.toml'
)
Progress = Callable[[str, str], None]


class InstallError(Exception):
    pass


def local_versions() -> tuple[str, str]:
    """(Python minor, Ray version) of this machine: what the cluster must run. (Ray is not imported
    here: it reads its authentication mode once, when first imported.)"""
    return f"{sys.version_info[0]}.{sys.version_info[1]}", metadata.version("ray")


def node_packages(extra: Sequence[str] = ()) -> list[str]:
    """What `install` puts on the nodes: Ray pinned to ours, then `extra`; a bare name is pinned to the
    version installed here, when there is one."""
    _py, ray_version = local_versions()
    pkgs = [f"ray[default]=={ray_version}"]
    for spec in extra:
        if spec.replace("-", "_").replace(".", "_").isidentifier():  # a bare name, no version or marker
            try:
                spec = f"{spec}=={metadata.version(spec)}"
            except metadata.PackageNotFoundError:
                pass
        pkgs.append(spec)
    return pkgs


#: What the head needs beyond the nodes' environment, for the code that calls the Exoscale API there with the
#: cluster's restricted key (the autoscaler's node provider, the autostop daemon): libcloud, Exoscale's signer.
HEAD_PACKAGES = ("apache-libcloud", "requests-exoscale-auth")


def head_packages() -> list[str]:
    """The head's extra packages, pinned to the versions this machine runs."""
    return [f"{name}=={metadata.version(name)}" for name in HEAD_PACKAGES]


def install_options(cfg: ClusterConfig) -> list[str]:
    """`install_options` split as a shell would (each word then quoted on its way to the node)."""
    try:
        return shlex.split(cfg.install.options)
    except ValueError as e:
        raise ConfigError(f"install_options {cfg.install.options!r}: {e} (give options as a shell would)") from None


def package_source(cfg: ClusterConfig) -> str:
    """Where `uv pip install` will look, as far as the configuration says: for the failure message."""
    words = install_options(cfg)
    for i, w in enumerate(words[:-1]):
        if w in ("--index-url", "-i", "--default-index", "--find-links", "-f"):
            return words[i + 1]
        if w.startswith(("--index-url=", "--default-index=", "--find-links=")):
            return w.split("=", 1)[1]
    for name in ("UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        if cfg.install.env.get(name):
            return cfg.install.env[name]
    return f"{DEFAULT_INDEX} (or the index in the node's /etc/uv/uv.toml)"


INSTALL_SCRIPT = r"""ENV="$HOME/{env}"
PY_MINOR={py}
WANT={want}
fail() {{  # the step that failed and what it needed
  echo "RAYSWEEP_FAILED $1|$2"
  exit 1
}}
check() {{
  [ -x "$ENV/bin/python" ] && [ "$(cat "$ENV/.raysweep-packages" 2>/dev/null)" = "$WANT" ] &&
    "$ENV/bin/python" -c 'import sys, ray; assert "%d.%d" % sys.version_info[:2] == sys.argv[1] and ray.__version__ == sys.argv[2]' {py} {ray}
}}
if check 2>/dev/null; then echo "RAYSWEEP already installed: python $PY_MINOR, ray "{ray}; exit 0; fi
UV=$(command -v uv || true)
if [ -z "$UV" ]; then UV={uv}; fi
if [ -z "$UV" ] && [ -x "$HOME/.local/bin/uv" ]; then UV="$HOME/.local/bin/uv"; fi
if [ -z "$UV" ]; then
  echo "RAYSWEEP installing uv"
  curl -fsSL --connect-timeout 20 {installer} | env UV_NO_MODIFY_PATH=1 sh >/dev/null || fail "installing uv" {installer}
  UV="$HOME/.local/bin/uv"
fi
[ -x "$UV" ] || fail "finding uv" "uv_path $UV (not an executable on the node)"
PY=$(command -v "python$PY_MINOR" || true)
if [ -z "$PY" ]; then
  echo "RAYSWEEP installing Python $PY_MINOR (the template has $(python3 -V 2>&1 || echo none))"
  "$UV" python install "$PY_MINOR" || fail "installing Python $PY_MINOR" {python_downloads}
  PY=$("$UV" python find "$PY_MINOR")
fi
echo "RAYSWEEP creating $ENV with $("$PY" -V)"
"$UV" venv --quiet --allow-existing --python "$PY" "$ENV" || fail "creating $ENV" ""
echo "RAYSWEEP installing {packages_text}"
"$UV" pip install --quiet --python "$ENV/bin/python" {options} {packages} || fail "installing packages" {source}
printf '%s' "$WANT" > "$ENV/.raysweep-packages"
check || fail "checking $ENV" ""
"""


def install_script(cfg: ClusterConfig, packages: Sequence[str]) -> str:
    """The script `install` runs on each node (with `set -euo pipefail`; setup_commands after it, as given)."""
    py, ray_version = local_versions()
    text = INSTALL_SCRIPT.format(
        env=NODE_ENV,
        py=shlex.quote(py),
        ray=shlex.quote(ray_version),
        want=shlex.quote(" ".join(packages)),
        uv=shlex.quote(cfg.install.uv_path or ""),
        installer=shlex.quote(UV_INSTALLER),
        python_downloads=shlex.quote(PYTHON_DOWNLOADS),
        options=" ".join(shlex.quote(w) for w in install_options(cfg)),
        packages=" ".join(shlex.quote(p) for p in packages),
        packages_text=" ".join(packages),
        source=shlex.quote(package_source(cfg)),
    )
    for i, cmd in enumerate(cfg.install.setup_commands, 1):  # the user's shell text, run as given, each on its own
        text += f"bash -c {shlex.quote(cmd)} || fail {shlex.quote(f'setup_commands[{i}]: {cmd}')} ''\n"
    text += 'echo "RAYSWEEP installed: python $PY_MINOR, ray "' + shlex.quote(ray_version) + "\n"
    return "set -euo pipefail\n" + text


def failure_line(r: NodeResult) -> str:
    """One line for a failed install: the step, what it needed, what to set; else the tail of stderr."""
    for line in r.stdout.splitlines():
        if line.startswith("RAYSWEEP_FAILED "):
            step, _, needed = line[len("RAYSWEEP_FAILED ") :].partition("|")
            cause = (r.stderr.strip().splitlines() or [""])[-1].strip()[:200]
            if needed.startswith(("http://", "https://", "/")):
                return f"stopped at step '{step}': could not reach {needed} ({cause}); {OFFLINE_HINT}"
            return f"stopped at step '{step}'" + (f" ({needed})" if needed else "") + (f": {cause}" if cause else "")
    tail = " ".join(r.stderr.strip().splitlines()[-2:])[-300:]
    return r.error + (f": {tail}" if tail else "")


def install(cfg: ClusterConfig, progress: Progress, extra_packages: Sequence[str] = ()) -> list[NodeResult]:
    """Install on every node in parallel; a failed node's `error` is one line saying which step failed."""
    acc = access.connect(cfg)
    extra = list(cfg.install.packages if cfg.install.packages is not None else extra_packages)
    text = install_script(cfg, node_packages(extra))
    head_text = install_script(cfg, node_packages(extra + head_packages()))
    try:
        env_exports(cfg.install.env)
    except ValueError as e:
        raise ConfigError(f"install_env: {e}") from None
    nodes = acc.state.ordered()
    for n in nodes:
        progress(n.name, "preparing the Python environment")

    def line(node: NodeRecord, out: str) -> None:
        if out.startswith("RAYSWEEP "):
            progress(node.name, out[len("RAYSWEEP ") :])

    results = acc.remote.run(
        nodes,
        lambda n: script(head_text if n.role == "head" else text),
        env=cfg.install.env,
        timeout=3600,
        on_line=line,
    )
    for r in results:
        if r.ok:
            progress(r.node.name, "ready")
        else:
            r.error = failure_line(r)
    return results


def check_versions(remote: Remote, head: NodeRecord) -> None:
    """Refuse, with both versions, when the cluster's Python minor or Ray differ from this machine's."""
    py, ray_version = local_versions()
    [r] = remote.run(
        [head],
        f"$HOME/{NODE_ENV}/bin/python -c "
        + shlex.quote("import sys, ray; print('%d.%d' % sys.version_info[:2], ray.__version__)"),
        timeout=60,
    )
    if not r.ok:
        if r.exit_code is None:
            raise InstallError(f"cannot reach the head {head.name} ({head.ip}): {r.error}")
        raise InstallError(
            f"no Ray environment on the head {head.name}: run `exoscale.py install` (or `make cluster-up`) first"
        )
    their_py, their_ray = r.stdout.split()
    if (their_py, their_ray) != (py, ray_version):
        raise InstallError(
            f"version mismatch: this machine has Python {py} and Ray {ray_version}, the cluster "
            f"has Python {their_py} and Ray {their_ray}; run `exoscale.py install` to match"
        )

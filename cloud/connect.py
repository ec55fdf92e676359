"""The one seam between `pipeline` and `cloud`: a Ray address for a cluster by name.

`pipeline` CLIs call `connect_cluster(NAME)` for `--cluster NAME` and nothing else of `cloud`:

    with connect_cluster("exp1") as conn:      # version check, SSH tunnel with a watchdog, token set
        ray.init(address=conn.address)
        ...
        why = conn.lost_reason()               # None, or why the head stopped answering

Call it before `import ray` where possible: Ray reads RAY_AUTH_MODE once, at import.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from cloud.ray_auth import use_token_auth

if TYPE_CHECKING:
    from cloud.tunnel import Tunnel


class ClusterConnection:
    """A `ray://` address that reaches a cluster's head through an SSH tunnel, open until `close()`."""

    def __init__(self, tunnel: Tunnel | None, address: str):
        self._tunnel = tunnel
        self.address = address

    def lost_reason(self) -> str | None:
        """Why the connection broke, if the tunnel's watchdog saw the head stop answering; else None."""
        if self._tunnel is not None and self._tunnel.lost:
            return f"its head {self._tunnel.head.ip} stopped answering over SSH"
        return None

    def close(self) -> None:
        """Shut Ray's client down first (else it keeps trying to reconnect), then the tunnel."""
        import sys

        if "ray" in sys.modules:
            import ray

            ray.shutdown()
        if self._tunnel is not None:
            self._tunnel.close()

    def __enter__(self) -> ClusterConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClusterConnection({self.address!r})"


def connect_cluster(name: str, config_path: str | None = None) -> ClusterConnection:
    """Connect to cluster `name` (its local state, or `config_path`'s settings); raises with a one-line
    message when the cluster cannot be reached or its versions differ from this machine's."""
    use_token_auth()
    from cloud.tunnel import connect_address

    tunnel, address = connect_address(name, config_path)
    return ClusterConnection(tunnel, address)

"""Where the local Exoscale keeps what it offers its hosts on this machine: shared by the offer (which fills
it) and the hosts (which see it), so both name the same directory."""

from __future__ import annotations

import os
from pathlib import Path

#: The directory of wheels offered to the hosts; RAYSWEEP_WHEELHOUSE names another (e.g. an empty one, to see
#: what a new machine goes through). It must be one the hosts are shown (cloud.sim.hosts.machine_paths).
WHEELHOUSE_ENV = "RAYSWEEP_WHEELHOUSE"
DEFAULT_WHEELHOUSE = Path("/var/tmp/raysweep-wheelhouse")


def wheelhouse_dir() -> Path:
    """Where the offered wheels are kept: $RAYSWEEP_WHEELHOUSE, else DEFAULT_WHEELHOUSE."""
    return Path(os.environ.get(WHEELHOUSE_ENV) or DEFAULT_WHEELHOUSE)

"""The per-cluster, IAM-restricted API key as the head node holds it: one 0600 JSON file.

The autoscaler's node provider (on the head) and the autostop daemon read it; nothing else on a node
holds Exoscale credentials, and never the user's own key. On the head it lives at `HEAD_PATH` (relative
to the login home); on the user's machine a copy sits in the cluster's state directory.

    {"key": "EXO...", "secret": "...", "endpoint": "https://api-ch-gva-2.exoscale.com/v2" | null,
     "zone": "ch-gva-2", "cluster": "NAME", "role_id": "...", "key_name": "...",
     "head_id": "..." | null, "pools": {"NODE_TYPE": "POOL_ID", ...}}

`head_id` and `pools` (an autoscaling cluster's): the head's own instance and the instance pool of each worker
node type, the only resources the key's role lets it touch (cloud.iam.pool_head_policy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cloud.exoscale_driver import Secret

#: Where the head keeps the restricted key, relative to the login user's home.
HEAD_PATH = ".raysweep/head-credentials.json"
#: The head's copy of the cluster state it needs (holds HEAD_PATH); an autoscaling cluster's YAML mounts
#: the user's machine's `state_dir/head/` there.
HEAD_STATE_DIR = "~/.raysweep"
HEAD_MOUNT = HEAD_STATE_DIR + "/"


@dataclass(frozen=True)
class HeadCredentials:
    key: str
    secret: Secret
    zone: str
    cluster: str
    endpoint: str | None = None
    role_id: str | None = None
    key_name: str | None = None
    head_id: str | None = None
    pools: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key,
                "secret": self.secret.reveal(),
                "endpoint": self.endpoint,
                "zone": self.zone,
                "cluster": self.cluster,
                "role_id": self.role_id,
                "key_name": self.key_name,
                "head_id": self.head_id,
                "pools": dict(self.pools),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> HeadCredentials:
        d = json.loads(text)
        return cls(
            key=d["key"],
            secret=Secret(d["secret"]),
            zone=d["zone"],
            cluster=d["cluster"],
            endpoint=d.get("endpoint"),
            role_id=d.get("role_id"),
            key_name=d.get("key_name"),
            head_id=d.get("head_id"),
            pools={str(k): str(v) for k, v in (d.get("pools") or {}).items()},
        )


def write(path: Path, creds: HeadCredentials) -> Path:
    """Write `creds` to `path`, created 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds.to_json())
    os.replace(tmp, path)
    return path


def read(path: Path | None = None) -> HeadCredentials:
    """Read the credentials file (default: `~/HEAD_PATH`); a clear error when it is missing or malformed."""
    path = path or Path.home() / HEAD_PATH
    try:
        return HeadCredentials.from_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no cluster credentials at {path}: the head was not set up by raysweep") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed cluster credentials file {path}: {type(e).__name__}") from None

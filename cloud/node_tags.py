"""Ray's per-node tags of nodes whose labels cannot hold them: an instance pool's members carry the pool's
labels only (Exoscale gives every member the pool's labels; the head's key may not relabel an instance), so
the node provider keeps their tags here, in one 0600 JSON file, as Ray's local provider keeps its cluster
state in a file: {node id: {tag: value}}.

On an autoscaling cluster's head the file is the autoscaler's own (`~/.raysweep-node-tags.json`); on the
user's machine it sits in the cluster's state directory. A node missing from it (a lost file, a new head) gets
back the tags its pool's labels give (its kind, node type and cluster), which is what the provider reports
until the autoscaler sets others.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


class TagStore:
    """Tags by node id, in memory and written through to `path` (None: in memory only). Thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tags: dict[str, dict[str, str]] = self._load()

    def _load(self) -> dict[str, dict[str, str]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in data.items()}
        except (ValueError, AttributeError) as e:
            log.warning("node tags file %s is unreadable (%s): rebuilding it from the pools' labels", self.path, e)
            return {}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._tags, f, sort_keys=True)
        os.replace(tmp, self.path)

    def get(self, node_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._tags.get(node_id, {}))

    def known(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._tags

    def update(self, node_ids: Iterable[str], tags: Mapping[str, str]) -> None:
        with self._lock:
            for nid in node_ids:
                self._tags.setdefault(nid, {}).update({k: str(v) for k, v in tags.items()})
            self._save()

    def forget(self, node_ids: Iterable[str]) -> None:
        with self._lock:
            gone = [n for n in node_ids if n in self._tags]
            for n in gone:
                del self._tags[n]
            if gone:
                self._save()

    def keep_only(self, node_ids: Iterable[str]) -> None:
        keep = set(node_ids)
        with self._lock:
            gone = [n for n in self._tags if n not in keep]
            for n in gone:
                del self._tags[n]
            if gone:
                self._save()

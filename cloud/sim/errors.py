"""The one error of the simulated account's state: a request Exoscale would refuse, and why."""

from __future__ import annotations


class ModelError(Exception):
    """A request the API refuses: kind is not-found (404), conflict (409), invalid (400) or forbidden (403)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

"""The one error of the simulated account's state: a request Exoscale would refuse, and why."""

from __future__ import annotations


class ModelError(Exception):
    """A request the API refuses: kind is not-found (404), conflict (409), invalid (400), forbidden (403),
    quota (403: past a quota of the organization) or capacity (500: the zone has no room for the type now).
    The last two statuses are this sim's choice: Exoscale does not document how it answers them."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

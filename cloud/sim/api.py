"""The local Exoscale API v2 in one import, for its users (tests, benchmarks, `python -m cloud.sim`).

Split as moto splits a fake cloud: the state and its rules in cloud.sim.model (IAM in cloud.sim.iam), the
HTTP handlers and renderers in cloud.sim.responses, which operations are served in cloud.sim.urls, the
request signature in cloud.sim.auth, the spec checks in cloud.sim.spec, the pipeline and server in
cloud.sim.server.

This package shares no code with cloud.exoscale_driver on purpose: the sim must catch the driver's
mistakes, not repeat them.
"""

from cloud.sim.auth import AuthError, signature_message, verify_signature
from cloud.sim.server import App, Exchange, HTTPFaults, SimServer
from cloud.sim.spec import KNOWN_REQUEST_DEVIATIONS, KNOWN_RESPONSE_DEVIATIONS, SpecError, SpecValidator, spec_path

__all__ = [
    "KNOWN_REQUEST_DEVIATIONS",
    "KNOWN_RESPONSE_DEVIATIONS",
    "App",
    "AuthError",
    "Exchange",
    "HTTPFaults",
    "SimServer",
    "SpecError",
    "SpecValidator",
    "signature_message",
    "spec_path",
    "verify_signature",
]

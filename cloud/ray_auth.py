"""Ray's environment for our clusters, in one place: token authentication on, the cluster's token.

Ray reads RAY_AUTH_MODE once, when first imported; the token (RAY_AUTH_TOKEN) it caches. The token itself
lives in the cluster's state (`StateStore.ensure_ray_token` / `ray_token`)."""

from __future__ import annotations

import os
import sys

AUTH_ENV = {"RAY_AUTH_MODE": "token"}  # also set for every Ray command on the nodes


class RayAuthError(Exception):
    pass


def use_token_auth(token: str | None = None) -> None:
    """Set token auth (and the token, when given) in this process's environment for Ray's clients; if Ray
    was imported already, reload its cached token and refuse when it fixed another mode."""
    os.environ.update(AUTH_ENV)
    if token is None:
        return
    os.environ["RAY_AUTH_TOKEN"] = token
    raylet = sys.modules.get("ray._raylet")  # (compiled; its type stub lacks the authentication API)
    if raylet is not None:
        raylet.AuthenticationTokenLoader.instance().reset_cache()
        if raylet.get_authentication_mode() != raylet.AuthenticationMode.TOKEN:
            raise RayAuthError(
                "Ray was imported before RAY_AUTH_MODE=token was set, and it reads that once; "
                "run with RAY_AUTH_MODE=token in the environment"
            )

"""The Ray that `retinaops train|sweep|demo` start in their own process when RAY_ADDRESS is unset.

It listens on 127.0.0.1 only and, like the local stack's (stack.py), refuses every request to its GCS,
dashboard and Jobs API that lacks its token: a fresh random one per process, in a file only its owner can
read ({home}/ray/auth_token-{pid}), removed when the process exits.

Ray 2.60's `ray.init()` would turn token auth on by itself, but with ~/.ray/auth_token: one token for every
cluster of the user, kept for ever and written with the umask's permissions (0644: readable by everyone on
the host), and not at all when RAY_AUTH_MODE=disabled is in the environment. Ray reads its auth settings
from the environment only (ray/_private/authentication/authentication_token_setup.py), in this process
and in every node process it starts, now and later (a worker starts whenever a task needs one): so they
stay set for the life of the process, as Ray's own `_enable_token_auth` leaves RAY_AUTH_MODE set.
"""

from __future__ import annotations

import atexit
import os
import secrets
from pathlib import Path

from retinaops.cluster.stack import write_private

HOST = "127.0.0.1"


def auth_env(token_file: Path) -> dict[str, str | None]:
    """Token auth with the token in token_file; RAY_AUTH_TOKEN (None: unset) would win over the file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_AUTH_TOKEN": None}


def new_token_file(home: Path) -> Path:
    """A fresh random token in {home}/ray/auth_token-{pid}, mode 0600: one per process, since two runs
    sharing a home each start their own Ray."""
    folder = home / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    token_file = folder / f"auth_token-{os.getpid()}"
    write_private(token_file, secrets.token_hex(32))
    return token_file


def start_embedded_ray(home: Path) -> Path:
    """`ray.init()` of a new local Ray on 127.0.0.1, its dashboard included (it serves the State API that
    Ray Train's clean-up relies on), with token auth and a fresh token; returns the token's file."""
    import ray
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    token_file = new_token_file(home)
    atexit.register(token_file.unlink, missing_ok=True)  # after ray.shutdown, which ray.init registers later
    for key, value in auth_env(token_file).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # Ray read RAY_AUTH_MODE into its config when it was imported, and ray.init() refreshes it only when it
    # turns token auth on by itself: refresh it (what that does), and forget any token loaded before.
    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(include_dashboard=True, dashboard_host=HOST, log_to_driver=True)
    return token_file

"""Development secrets: what ``callmesh up`` generates so that ``callmesh call`` (and the
load tests) can mint their own tokens without any setup.

``callmesh up`` writes the call-token secret to a file only its user can read; a client
on the same machine finds it there when ``CALLMESH_AUTH_SECRET`` is not set. Production
never reads the file: routers take their secret from configuration.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

AUTH_SECRET_ENV = "CALLMESH_AUTH_SECRET"
LINK_SECRET_ENV = "CALLMESH_LINK_SECRET"
DEV_SECRET_FILE_ENV = "CALLMESH_DEV_SECRET_FILE"


def new_secret() -> str:
    """A fresh random secret (256 bits, 43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def dev_secret_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(DEV_SECRET_FILE_ENV):
        return Path(env[DEV_SECRET_FILE_ENV])
    base = env.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "callmesh" / "dev-secret"


def write_dev_secret(secret: str, env: Mapping[str, str] | None = None) -> Path:
    """Store the development secret for this user's clients (mode 0600)."""
    path = dev_secret_path(env)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def read_dev_secret(env: Mapping[str, str] | None = None) -> str | None:
    """``CALLMESH_AUTH_SECRET``, else the secret ``callmesh up`` left, else None."""
    env = os.environ if env is None else env
    if env.get(AUTH_SECRET_ENV):
        return env[AUTH_SECRET_ENV]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        secret = dev_secret_path(env).read_text().strip()
        return secret or None
    return None

"""The monitor's bearer token, kept at `$DISPATCH_HOME/serve-token` (mode 0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dispatch.errors import EnvironmentProblem

TOKEN_FILE = "serve-token"


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def load_or_create(home: Path, *, renew: bool = False) -> str:
    """The kept token, or a new one when there is none (or `renew`)."""
    path = token_path(home)
    if not renew:
        try:
            token = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            token = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvironmentProblem(f"cannot read the monitor token {path}: {exc}") from None
        if token:
            return token
    token = secrets.token_urlsafe(32)
    try:
        home.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed over: a reader never sees half a token, and the
        # file is 0600 from its first byte (no window where another user could read it).
        fresh = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
        os.chmod(fresh, 0o600)  # O_CREAT's mode is masked by the umask, chmod is not
        os.replace(fresh, path)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write the monitor token {path}: {exc}") from None
    return token

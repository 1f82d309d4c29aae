"""The control API's token when none is configured: generated once, kept beside the state file.

With no `[control] token_env` variable set and no `token_file`, the daemon creates a token at its
first start in `<state path>.token` (`execmon.db.token`, mode 0600) and reuses it on every later
start; the client commands (`execmon add`, `ls`, ...) read it from the same place through the same
config. So the control API is never open, and one machine needs no set-up for it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from monitor.config import Config, ConfigError
from monitor.logs import get_logger
from monitor.secrets import Secret

log = get_logger(__name__)

TOKEN_SUFFIX = ".token"  # noqa: S105 - a file name suffix, not a token
_TOKEN_BYTES = 32  # 256 bits of randomness, 43 URL-safe characters


def token_path(config: Config) -> Path:
    """Where the generated token lives: the state file's path with `.token` added."""
    return Path(config.state.path + TOKEN_SUFFIX)


def read_token_file(path: Path) -> Secret | None:
    """The token in `path`, or None when there is no such file (the daemon has not started yet)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read the control token file {path}: {reason}") from None
    if not text:
        raise ConfigError(f"the control token file {path} is empty: delete it, and the daemon makes a new one")
    return Secret(text)


def load_or_create_token(path: Path) -> Secret:
    """The token in `path`, created first when the file does not exist."""
    token = read_token_file(path)
    if token is None:
        _create(path)
        token = read_token_file(path)
        assert token is not None, "the token file was just created"
    elif path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the control token file can be read by other users: chmod 600 it", path=str(path))
    return token


def _create(path: Path) -> None:
    """Write a new token to a private temporary file, then link it into place.

    O_EXCL with mode 0600 means the file is never readable by others, not even for a moment; the
    link is atomic, so nobody ever reads a half-written token, and if another process created the
    file first, its token wins (FileExistsError) and this one is dropped.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_private(tmp, secrets.token_urlsafe(_TOKEN_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process created it first: its token wins
    except OSError as exc:
        raise ConfigError(
            f"cannot create the control token file {path}: {exc.strerror or exc}; "
            "set [control] token_env or token_file instead"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created the control token for the client commands", path=str(path))


def _write_private(path: Path, token: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)  # a crash must not leave an empty token file behind
    finally:
        os.close(fd)

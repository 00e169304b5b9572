"""Browser sessions: a signed, expiring token that stands for an API key (``/login``).

A token is ``<key id>.<expires>.<nonce>.<mac>``: the key row's id, the expiry (Unix seconds),
16 random bytes, and HMAC-SHA256 over those and the key's stored hash, keyed with the
deployment's session secret. The token holds nothing secret of the key. Verifying checks the
MAC and the expiry, then reads the key row: a revoked (or replaced) key ends its sessions at
the next request, and the role is the key's, exactly as with a Bearer header.

Each session has a CSRF token, HMAC(secret, "csrf" + nonce): the server can recompute it from the
session token, another site can neither read nor guess it (the double-submit pattern, signed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from services.core.auth import Principal, Role
from services.core.db.tables import ApiKey
from services.core.errors import InvalidParameter, OutputError

SECRET_FILE_NAME = "session.secret"
MIN_SECRET_CHARS = 32
MAX_KEY_ID = 2**31  # row ids are 32-bit integers: a larger one is no key (and no query)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 12


def load_secret(configured: str, data_dir: Path) -> bytes:
    """The signing secret: ``configured`` (CRGATE_SESSION_SECRET) or ``<data-dir>/session.secret``,
    created on first use with 32 random bytes (mode 0600; the first process to create it wins,
    so API processes sharing a data directory share the secret)."""
    if configured:
        if len(configured) < MIN_SECRET_CHARS:
            raise InvalidParameter(
                f"CRGATE_SESSION_SECRET has {len(configured)} characters; use at least "
                f"{MIN_SECRET_CHARS} random ones (e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`)"
            )
        return configured.encode()
    path = Path(data_dir) / SECRET_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the session secret ({exc.strerror})") from None
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    for _ in range(50):  # another process may be between its create and its write
        text = path.read_text().strip()
        if text:
            return text.encode()
        time.sleep(0.01)
    raise OutputError(f"{path} is empty: delete it and start again to make a new secret")


@dataclass(frozen=True)
class Issued:
    """A new session: the cookie value, its CSRF token and when it expires (Unix seconds)."""

    token: str
    csrf: str
    expires: int


@dataclass(frozen=True)
class Verified:
    """A valid session: who it is, its CSRF token and when it expires (Unix seconds)."""

    principal: Principal
    csrf: str
    expires: int


class SessionSigner:
    """Issues and verifies session tokens with one secret and lifetime."""

    def __init__(self, secret: bytes, lifetime_seconds: float) -> None:
        self._secret = secret
        self.lifetime_seconds = int(lifetime_seconds)

    def _mac(self, payload: str, key_hash: str) -> str:
        digest = hmac.new(self._secret, f"{payload}.{key_hash}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def csrf_of(self, nonce: str) -> str:
        digest = hmac.new(self._secret, f"csrf.{nonce}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def issue(self, session: Session, key_id: int, *, now: float | None = None) -> Issued:
        """A session for the (already verified) key ``key_id``."""
        row = session.get(ApiKey, key_id)
        if row is None:
            raise InvalidParameter(f"no API key with id {key_id}")
        expires = int(now if now is not None else time.time()) + self.lifetime_seconds
        nonce = secrets.token_urlsafe(16)
        payload = f"{key_id}.{expires}.{nonce}"
        token = f"{payload}.{self._mac(payload, row.key_hash)}"
        return Issued(token=token, csrf=self.csrf_of(nonce), expires=expires)

    def verify(self, session: Session, token: str, *, now: float | None = None) -> Verified | None:
        """The session's principal, or None when the token is forged, expired or its key revoked."""
        parts = token.split(".")
        if len(parts) != 4 or not all(_is_number(p) for p in parts[:2]) or not token.isascii():
            return None
        key_id, expires, nonce, mac = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if key_id >= MAX_KEY_ID or expires <= (now if now is not None else time.time()):
            return None
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return None
        expected = self._mac(f"{key_id}.{expires}.{nonce}", row.key_hash)
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        principal = Principal(name=row.name, role=Role(row.role), key_id=row.id)
        return Verified(principal=principal, csrf=self.csrf_of(nonce), expires=expires)

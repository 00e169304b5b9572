"""API keys: creation, verification, revocation, and the first admin key.

A key is ``crg_<prefix>_<secret>``: the prefix (public) finds the row, the secret (32 random
bytes) is checked against its SHA-256. A fast hash is enough for a random 256-bit secret (there is
nothing to brute-force); only the hash is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.core import audit
from services.core.db.tables import ApiKey
from services.core.dicom.io import atomic_output
from services.core.errors import InvalidParameter, NotFound

KEY_FILE_NAME = "admin.key"
KEY_ENTITY = "key"  # the audit log's entity for API keys


class Role(StrEnum):
    ADMIN = "admin"  # everything, including policies and keys
    OPERATOR = "operator"  # store, classify, read
    VIEWER = "viewer"  # read

    @property
    def rank(self) -> int:
        return {"viewer": 1, "operator": 2, "admin": 3}[self.value]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's name and role (key_id None for anonymous viewers)."""

    name: str
    role: Role
    key_id: int | None


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidParameter(
            f"unknown role {value!r}; choose one of {', '.join(r.value for r in Role)}"
        ) from None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(
    session: Session, *, name: str, role: Role, actor: str = "system"
) -> tuple[ApiKey, str]:
    """Create a key (audit-logged); return its row and the token, which is shown once and
    never stored."""
    if not name.strip():
        raise InvalidParameter("a key needs a name (who or what uses it)")
    prefix = secrets.token_hex(4)
    token = f"crg_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(name=name.strip()[:128], role=role.value, prefix=prefix, key_hash=_hash(token))
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=KEY_ENTITY,
        entity_id=row.id,
        before=None,
        after=_key_snapshot(row),
    )
    return row, token


def _key_snapshot(row: ApiKey) -> dict[str, Any]:
    """What the audit log keeps of a key: never its secret or hash."""
    revoked = row.revoked_at.isoformat() if row.revoked_at else None
    return {"id": row.id, "name": row.name, "role": row.role, "prefix": row.prefix,
            "revoked_at": revoked}  # fmt: skip


def verify_key(session: Session, token: str) -> Principal | None:
    """The principal for ``token``, or None when it is unknown, malformed or revoked."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "crg":
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == parts[1])).first()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, _hash(token)):
        return None
    row.last_used_at = datetime.now(UTC)
    return Principal(name=row.name, role=Role(row.role), key_id=row.id)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, *, key: str, actor: str = "system") -> ApiKey:
    """Revoke by id or prefix (audit-logged); revoking twice is harmless."""
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == key)).first()
    if row is None and key.isdigit():  # prefixes are hex and may be all digits: prefix first
        row = session.get(ApiKey, int(key))
    if row is None:
        raise NotFound(f"no API key with id or prefix {key!r} (see `crgate keys list`)")
    if row.revoked_at is None:
        before = _key_snapshot(row)
        row.revoked_at = datetime.now(UTC)
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="revoke",
            entity=KEY_ENTITY,
            entity_id=row.id,
            before=before,
            after=_key_snapshot(row),
        )
    return row


def ensure_admin_key(sessions: sessionmaker[Session], data_dir: Path) -> Path | None:
    """On first start (no key at all) create an admin key in ``<data-dir>/admin.key`` (0600).

    Returns the file's path when a key was created, else None.
    """
    with sessions() as session, session.begin():
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        _row, token = create_key(session, name="first admin (admin.key)", role=Role.ADMIN)
        path = Path(data_dir) / KEY_FILE_NAME
        old_umask = os.umask(0o077)
        try:
            with atomic_output(path) as fh:
                fh.write(token.encode() + b"\n")
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
    return path

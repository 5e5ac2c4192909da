"""Pure core: bearer tokens, roles and who may do what (docs/adr/0006-api-auth.md).

A token is `vy_` + 43 base64url characters (32 random bytes). Only its sha256 is stored: the secret is
high-entropy, so a fast hash is enough (nothing to brute-force) and a lookup by hash is safe; the
stored hash is still compared in constant time. Roles are ordered: viewer < member < admin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final, Literal, get_args

import msgspec

from verlyard_api.errors import Forbidden, Unauthorized

Role = Literal["viewer", "member", "admin"]
ROLES: Final[tuple[str, ...]] = get_args(Role)
_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}

TOKEN_PREFIX: Final = "vy_"
TOKEN_RE: Final = re.compile(r"vy_[A-Za-z0-9_-]{43}")
SECRET_BYTES: Final = 32
TOKEN_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
"""Token names: letters, digits, `.`, `_`, `@`, `-`; at most 63 characters (they appear in actors)."""


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: the token's id, name and role."""

    token_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The `actor` recorded on every event this caller causes."""
        return token_actor(self.token_id, self.name)


def token_actor(token_id: str, name: str) -> str:
    return f"token:{token_id}:{name}"


def mint_token(secret: bytes) -> tuple[str, str]:
    """`(token, sha256 hex)` from `SECRET_BYTES` random bytes (the caller draws them: randomness is a parameter)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a token needs {SECRET_BYTES} random bytes, got {len(secret)}")
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(secret).decode().rstrip("=")
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode(), b.encode())


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; Unauthorized when missing or malformed."""
    if not header:
        raise Unauthorized("this route needs a token: send `Authorization: Bearer <token>`")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    token = value.strip()
    if not TOKEN_RE.fullmatch(token):
        raise Unauthorized("the token is not valid")
    return token


def has_role(principal: Principal, minimum: Role) -> bool:
    return _RANK[principal.role] >= _RANK[minimum]


def require_role(principal: Principal, minimum: Role) -> None:
    if not has_role(principal, minimum):
        raise Forbidden(f"this needs the {minimum} role; token {principal.name!r} has the {principal.role} role")


def require_owner(principal: Principal, pipeline_id: str, submitted_by: str) -> None:
    """Members manage their own pipelines; admins manage every pipeline."""
    require_role(principal, "member")
    if principal.role != "admin" and submitted_by != principal.actor:
        raise Forbidden(
            f"pipeline {pipeline_id} was submitted by another token; members manage only their own pipelines"
        )

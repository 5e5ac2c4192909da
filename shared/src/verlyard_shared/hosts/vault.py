"""Pure core: the credential vault — a named key ring (VERLYARD_SECRET_KEY) and AES-GCM sealed envelopes.

`VERLYARD_SECRET_KEY` is a comma-separated key ring `id:base64(32 bytes)`, e.g. `k2:...,k1:...`: the
first key seals, every key opens, and each ciphertext records the id of the key that sealed it, so a
rotation (put the new key first, re-seal every host, then drop the old key) never guesses. The host's
name is the associated data: a ciphertext copied onto another host's row does not open.
Nothing here ever puts key material or a credential into an exception message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
ENVELOPE_VERSION: Final = b"\x01"
"""First byte of every sealed blob (a later format gets a new version byte)."""


class VaultError(Exception):
    """The key ring is malformed, or a credential cannot be opened; the message names no secret."""


class Credential:
    """A host's login secret: a password, or a private key (OpenSSH/PEM text) with an optional passphrase.

    Its repr is redacted: a credential that reaches a traceback or a log line shows nothing.
    """

    __slots__ = ("passphrase", "password", "private_key")

    def __init__(
        self, *, password: str | None = None, private_key: str | None = None, passphrase: str | None = None
    ) -> None:
        if (password is None) == (private_key is None):
            raise VaultError("a credential is a password or a private key (exactly one)")
        if passphrase is not None and private_key is None:
            raise VaultError("a passphrase goes with a private key")
        self.password = password
        self.private_key = private_key
        self.passphrase = passphrase

    @property
    def kind(self) -> str:
        return "password" if self.password is not None else "key"

    def __repr__(self) -> str:
        return f"Credential(kind={self.kind!r}, <redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credential) and (self.password, self.private_key, self.passphrase) == (
            other.password,
            other.private_key,
            other.passphrase,
        )

    def __hash__(self) -> int:
        return hash(self.kind)


class _Plain(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    password: str | None = None
    private_key: str | None = None
    passphrase: str | None = None


_decode_plain = msgspec.json.Decoder(_Plain)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed credential as stored: the id of the key that sealed it and `version || nonce || ciphertext`."""

    key_id: str
    blob: bytes

    def __repr__(self) -> str:
        return f"Sealed(key_id={self.key_id!r}, {len(self.blob)} bytes)"


def aad_for(host_name: str) -> bytes:
    """Associated data binding a ciphertext to its host row."""
    return b"verlyard-host:" + host_name.encode()


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Named AES-256 keys, the first one current (it seals); all of them open."""

    _keys: tuple[tuple[str, bytes], ...]

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids!r})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._keys)

    @property
    def current(self) -> str:
        return self._keys[0][0]

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """Parse `id:base64,id:base64,...` (whitespace around entries ignored). Raises VaultError."""
        keys: list[tuple[str, bytes]] = []
        for position, raw in enumerate(text.split(","), start=1):
            entry = raw.strip()
            if not entry:
                continue
            key_id, sep, encoded = entry.partition(":")
            if not sep or not KEY_ID.fullmatch(key_id):
                raise VaultError(
                    f"VERLYARD_SECRET_KEY entry {position}: expected ID:BASE64 with an id of {KEY_ID.pattern}"
                )
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise VaultError(f"VERLYARD_SECRET_KEY key {key_id!r}: not valid base64") from None
            if len(key) != KEY_BYTES:
                raise VaultError(
                    f"VERLYARD_SECRET_KEY key {key_id!r}: {len(key)} bytes, expected {KEY_BYTES} "
                    "(e.g. `head -c 32 /dev/urandom | base64`)"
                )
            if any(k == key_id for k, _ in keys):
                raise VaultError(f"VERLYARD_SECRET_KEY names key {key_id!r} twice")
            keys.append((key_id, key))
        if not keys:
            raise VaultError("VERLYARD_SECRET_KEY holds no key")
        return cls(tuple(keys))

    def _key(self, key_id: str) -> bytes:
        for k, key in self._keys:
            if k == key_id:
                return key
        raise VaultError(
            f"the credential was sealed with key {key_id!r}, which VERLYARD_SECRET_KEY does not hold "
            f"(it holds {', '.join(self.ids)})"
        )

    def seal(self, credential: Credential, *, aad: bytes, nonce: bytes) -> Sealed:
        """Encrypt with the current key. `nonce`: 12 fresh random bytes (never reused with a key)."""
        if len(nonce) != NONCE_BYTES:
            raise VaultError(f"a nonce is {NONCE_BYTES} bytes")
        plain = msgspec.json.encode(
            _Plain(password=credential.password, private_key=credential.private_key, passphrase=credential.passphrase)
        )
        key_id, key = self._keys[0]
        header = ENVELOPE_VERSION + nonce
        return Sealed(key_id=key_id, blob=header + AESGCM(key).encrypt(nonce, plain, aad + b"|" + key_id.encode()))

    def open(self, sealed: Sealed, *, aad: bytes) -> Credential:
        """Decrypt with the key the envelope names. Raises VaultError (wrong key, tampered, foreign row)."""
        key = self._key(sealed.key_id)
        blob = sealed.blob
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != ENVELOPE_VERSION:
            raise VaultError("the stored credential is not a verlyard envelope (version 1)")
        nonce, body = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plain = AESGCM(key).decrypt(nonce, body, aad + b"|" + sealed.key_id.encode())
        except InvalidTag:
            raise VaultError(
                f"the stored credential does not open with key {sealed.key_id!r} (wrong key material, "
                "or the row was tampered with or copied from another host)"
            ) from None
        fields = _decode_plain.decode(plain)
        return Credential(password=fields.password, private_key=fields.private_key, passphrase=fields.passphrase)

    def reseal(self, sealed: Sealed, *, aad: bytes, nonce: bytes) -> Sealed:
        """Open with whichever key sealed it, seal with the current key (a rotation step)."""
        return self.seal(self.open(sealed, aad=aad), aad=aad, nonce=nonce)

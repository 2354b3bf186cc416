"""Protection at rest for a device program: AES-256-GCM over the whole file, decrypted in memory.

A sealed file is ``MAGIC | version (1 byte) | key check (8 bytes) | nonce (12 bytes) | ciphertext
and tag``. The header is authenticated with the ciphertext (GCM's associated data), so changing any
byte of the file makes ``unseal`` refuse it. The key check is ``HMAC-SHA256(key, "divqat key
check")[:8]``: it tells a wrong key from a tampered file without revealing anything useful about
a 256-bit key.

A key file holds 32 random bytes as 64 hex characters (one line), the form a device keystore or a
key server hands over. What this does and does not protect is in the device guide (docs/guides/device.md, "Protection at rest"):
it keeps the program unreadable to whoever copies the file without the key; it does nothing
against a thief who also gets the key (a key shipped in the same app, a rooted device, a memory
dump of the running app).

Needs the ``cryptography`` package (``pip install 'divqat[edge]'``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from divqat.errors import ArtifactError, MissingExtra
from divqat.io import atomic_write

MAGIC = b"DIVQAT-SEALED\x00"
VERSION = 1
KEY_BYTES = 32
_CHECK, _NONCE = 8, 12
_HEADER = len(MAGIC) + 1 + _CHECK + _NONCE


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise MissingExtra("encrypted programs need the cryptography package: pip install "
                           "'divqat[edge]'") from None
    return AESGCM(key)


def key_check(key: bytes) -> bytes:
    return hmac.new(key, b"divqat key check", hashlib.sha256).digest()[:_CHECK]


def new_key(path: str | Path) -> bytes:
    """Write a fresh random 256-bit key to ``path`` (hex, owner-only permissions) and return it.
    Refuses to overwrite an existing file: a lost key makes its programs unreadable."""
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)

    def write(tmp: str) -> None:
        os.chmod(tmp, 0o600)
        Path(tmp).write_text(key.hex() + "\n")

    if path.exists():
        raise ArtifactError(f"{path} exists; a new key is never written over an old one")
    atomic_write(path, write)
    return key


def read_key(path: str | Path) -> bytes:
    """The 32-byte key in a key file (64 hex characters), or one clear ``ArtifactError``."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ArtifactError(f"no key file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read the key file {path} ({e})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ArtifactError(f"{path} is not a divqat key: expected {2 * KEY_BYTES} hex characters "
                            "(a 256-bit key, as `divqat export --encrypt-key-file` writes)")
    return key


def is_sealed(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def seal(data: bytes, key: bytes) -> bytes:
    """``data`` encrypted and authenticated under ``key`` (a fresh random nonce each call)."""
    header = MAGIC + bytes([VERSION]) + key_check(key) + secrets.token_bytes(_NONCE)
    return header + _aesgcm(key).encrypt(header[-_NONCE:], data, header)


def unseal(data: bytes, key: bytes, name: str = "the file") -> bytes:
    """The plaintext of a sealed file, in memory only; ``ArtifactError`` in one line for a wrong
    key, a tampered or truncated file, or a file that is not sealed."""
    aes = _aesgcm(key)
    from cryptography.exceptions import InvalidTag

    if not is_sealed(data):
        raise ArtifactError(f"{name} is not an encrypted divqat program")
    if len(data) < _HEADER + 16 or data[len(MAGIC)] != VERSION:
        raise ArtifactError(f"{name} is truncated or of an unknown sealed format; refused")
    header = data[:_HEADER]
    if not hmac.compare_digest(header[len(MAGIC) + 1:len(MAGIC) + 1 + _CHECK], key_check(key)):
        raise ArtifactError(f"{name} was encrypted with a different key; refused")
    try:
        return aes.decrypt(header[-_NONCE:], data[_HEADER:], header)
    except InvalidTag:
        raise ArtifactError(f"{name} failed authentication: it was altered or truncated after "
                            "encryption; refused") from None


__all__ = ["KEY_BYTES", "MAGIC", "is_sealed", "key_check", "new_key", "read_key", "seal", "unseal"]

"""Principals (who is calling) and their roles, from API_KEYS and the API_KEYS_FILE (docs/reliability.md).

API_KEYS_FILE is a TOML file, one table per key; the key itself is never stored, only its SHA-256:

    [[keys]]
    name = "alice"                 # letters, digits, `_.-`; 1-64 characters; unique
    role = "learner"               # learner | admin
    sha256 = "<hex sha256 of the key>"
    # optional, per principal (else PRINCIPAL_MAX_CONCURRENT / PRINCIPAL_TOKENS_PER_MINUTE; 0 = off):
    max_concurrent = 2
    tokens_per_minute = 5000

Keys in API_KEYS are admins and act as the operator principal `local`, which is also who calls when no key is
configured at all (one local admin, as before keys had names). `local` keeps the seed's default session id
(DEFAULT_SESSION, "default"); every other principal's default session is `DEFAULT_SESSION:<name>`.
A malformed file, an unknown role or a duplicate stops start-up with a message naming the file and line.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import SettingsError
from agent.engine.errors import EngineError
from agent.serving.api.store.base import LOCAL_OWNER

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_FIELDS = {"name", "role", "sha256", "max_concurrent", "tokens_per_minute"}


class Role(enum.StrEnum):
    learner = "learner"  # chat (/chat, /v1/*) and their own sessions, history and usage
    admin = "admin"  # everything: /load_model, every session, everyone's usage


class ForbiddenError(EngineError):
    """The caller's role may not use this route (403, naming the role it needs)."""

    status, code = 403, "forbidden"


class KeysFileError(SettingsError):
    """API_KEYS_FILE cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name (owner of sessions, usage rows), a role, and optional own limits."""

    name: str
    role: Role
    max_concurrent: int | None = None  # None: PRINCIPAL_MAX_CONCURRENT
    tokens_per_minute: int | None = None  # None: PRINCIPAL_TOKENS_PER_MINUTE

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin

    def default_session(self, base: str) -> str:
        """The session `/chat` uses when none is named: the seed's for `local`, `<base>:<name>` for the others."""
        return base if self.name == LOCAL_OWNER else f"{base}:{self.name}"

    def require(self, role: Role, action: str) -> None:
        """Raise 403 unless this principal has `role` (admins have every role)."""
        if self.role is not role and not self.is_admin:
            raise ForbiddenError(f"{action} needs the {role} role; {self.name!r} is a {self.role}")


LOCAL_ADMIN = Principal(LOCAL_OWNER, Role.admin)
ANONYMOUS = Principal("anonymous", Role.learner)  # a request on a PUBLIC_PATHS route without a key


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """Key digests and their principals; `lookup` compares in constant time against every key (no early exit)."""

    def __init__(self, entries: Sequence[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)

    @classmethod
    def build(cls, api_keys: Sequence[str], keys_file: Path | None) -> KeyRing:
        """API_KEYS (admins, principal `local`) plus the API_KEYS_FILE entries."""
        entries = [(digest(k), LOCAL_ADMIN) for k in api_keys if k]
        if keys_file is not None:
            entries += load_keys_file(keys_file)
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def lookup(self, candidate: str | None) -> Principal | None:
        """The principal whose key is `candidate`, or None."""
        if not candidate or not self._entries:
            return None
        wanted, found = digest(candidate), None
        for ref, principal in self._entries:
            if hmac.compare_digest(wanted, ref):
                found = principal
        return found

    def check(self, candidate: str | None) -> bool:
        return self.lookup(candidate) is not None

    def principals(self) -> list[Principal]:
        return list({p.name: p for _, p in self._entries}.values())


def load_keys_file(path: Path) -> list[tuple[bytes, Principal]]:
    """Parse API_KEYS_FILE; every problem raises `KeysFileError` naming `path:line`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"API_KEYS_FILE {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_in_message(str(exc))
        raise KeysFileError(f"API_KEYS_FILE {path}:{line}: not valid TOML: {exc}") from None
    lines = text.splitlines()
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise KeysFileError(f"API_KEYS_FILE {path}:{_find(lines, unknown[0])}: unknown top-level key {unknown[0]!r}")
    tables = data.get("keys", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise KeysFileError(f"API_KEYS_FILE {path}:{_find(lines, 'keys')}: `keys` must be [[keys]] tables")
    headers = [i + 1 for i, line in enumerate(lines) if re.match(r"^\s*\[\[\s*keys\s*\]\]", line)]
    entries: list[tuple[bytes, Principal]] = []
    names: set[str] = set()
    for index, table in enumerate(tables):
        start = headers[index] if index < len(headers) else 1
        end = headers[index + 1] if index + 1 < len(headers) else len(lines) + 1

        def fail(field: str, problem: str, *, start: int = start, end: int = end, index: int = index) -> KeysFileError:
            line = _find(lines, field, start, end) if field else start
            return KeysFileError(f"API_KEYS_FILE {path}:{line}: keys[{index}]: {problem}")

        extra = sorted(set(table) - _FIELDS)
        if extra:
            raise fail(extra[0], f"unknown field {extra[0]!r} (allowed: {', '.join(sorted(_FIELDS))})")
        for field in ("name", "role", "sha256"):
            if not isinstance(table.get(field), str):
                raise fail(field if field in table else "", f"`{field}` is required (a string)")
        name, role, sha = table["name"], table["role"], table["sha256"]
        if not NAME_PATTERN.match(name):
            raise fail("name", f"name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        if name in names:
            raise fail("name", f"name {name!r} appears twice")
        if name in (LOCAL_OWNER, ANONYMOUS.name):
            raise fail("name", f"name {name!r} is reserved (API_KEYS keys are {LOCAL_OWNER!r})")
        if role not in Role.__members__:
            raise fail("role", f"unknown role {role!r} (roles: {', '.join(Role)})")
        if not _SHA256.match(sha):
            raise fail("sha256", "sha256 must be 64 hex digits (`printf %s KEY | sha256sum`), not the key itself")
        limits = {}
        for field in ("max_concurrent", "tokens_per_minute"):
            value = table.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise fail(field, f"`{field}` must be an integer >= 0 (0 = no limit)")
            limits[field] = value
        names.add(name)
        entries.append((bytes.fromhex(sha), Principal(name, Role(role), **limits)))
    return entries


def _find(lines: list[str], field: str, start: int = 1, end: int | None = None) -> int:
    """The 1-based line in [start, end) where `field =` (or a table of that name) is written; else `start`."""
    pattern = re.compile(rf"^\s*(\[\[?\s*)?{re.escape(field)}\b")
    for number in range(start, (end or len(lines) + 1)):
        if number - 1 < len(lines) and pattern.match(lines[number - 1]):
            return number
    return start


def _line_in_message(message: str) -> int:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else 1

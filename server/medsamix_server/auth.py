"""Users, passwords and bearer tokens.

Users live in a JSON file (``medsamix-users`` edits it) as ``{"users": {name: {"role": ..., "password": ...}}}``
where the password is stored as ``scrypt$n$r$p$<salt b64>$<hash b64>`` (never in clear; there is no default user
and no default password). Roles: ``annotator`` (infer, read the datastore, save labels, sessions) and ``admin``
(also training, deleting, logs). The file is re-read when it changes, so removing a user or changing a role takes
effect on that user's next request.

Tokens are HS256 JWTs (PyJWT) signed with a random key made at server start (so a restart logs every client out)
and valid for ``ttl_s`` seconds; they carry the user name and are checked against the current users file on every
request. Login failures are counted per user name and client address: after :data:`MAX_FAILURES` within
:data:`FAILURE_WINDOW_S` further attempts are answered 429 until the window passes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import jwt
from medsamix.atomic import atomic_write_text

ROLES = ("annotator", "admin")
MIN_PASSWORD = 12
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0
_SCRYPT = (2**14, 8, 1)


class AuthError(Exception):
    """Login or token refused; ``status`` is 401, 403 or 429."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class User:
    """An authenticated user."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, role: str) -> bool:
        """Whether this user may act with ``role`` (admin may do everything an annotator may)."""
        return self.role == "admin" or role == self.role


LOCAL_ADMIN = User("local", "admin")  # every client when authentication is off (loopback only)


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``password`` with a fresh random salt."""
    n, r, p = _SCRYPT
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return "$".join(["scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the ``scrypt$...`` string (constant-time comparison)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(base64.b64decode(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")


class UserStore:
    """The users file (see the module docstring), re-read when its modification time changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict[str, str]] = {}

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._users = read_users(self.path)
                self._stamp = stamp
            return self._users

    def names(self) -> list[str]:
        return sorted(self._load())

    def user(self, name: str) -> User | None:
        entry = self._load().get(name)
        return User(name, entry["role"]) if entry else None

    def verify(self, name: str, password: str) -> User | None:
        entry = self._load().get(name)
        if entry is None:
            verify_password(password, hash_password("x" * MIN_PASSWORD))  # same cost for unknown names
            return None
        return User(name, entry["role"]) if verify_password(password, entry["password"]) else None


def read_users(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The users of a users file (checked); ``{}`` when the file does not exist.

    Raises:
        ValueError: Unreadable file, unknown role or a password that is not a scrypt hash (the message names the
            file and the user)."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
        users = data["users"]
        if not isinstance(users, dict):
            raise TypeError("'users' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a users file ({e})") from None
    out: dict[str, dict[str, str]] = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            raise ValueError(f"{p}: user {name!r}: role must be one of {', '.join(ROLES)}")
        if not str(entry.get("password", "")).startswith("scrypt$"):
            raise ValueError(f"{p}: user {name!r}: password must be stored hashed (use medsamix-users)")
        out[str(name)] = {"role": str(entry["role"]), "password": str(entry["password"])}
    return out


def write_users(path: str | os.PathLike[str], users: dict[str, dict[str, str]]) -> None:
    """Write the users file atomically, readable by its owner only."""
    atomic_write_text(path, json.dumps({"users": users}, indent=2), mode=0o600)


class Authenticator:
    """Logins and tokens over a :class:`UserStore`; ``enabled`` is False when the store has no users file."""

    def __init__(self, store: UserStore | None, ttl_s: float = 12 * 3600) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._key = secrets.token_bytes(32)
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def _throttle(self, key: tuple[str, str], failed: bool | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(key, []) if now - t < FAILURE_WINDOW_S]
            if failed is None:
                if len(recent) >= MAX_FAILURES:
                    raise AuthError("too many failed logins; try again later", 429)
            elif failed:
                recent.append(now)
            else:
                recent = []
            if recent:
                self._failures[key] = recent
            else:
                self._failures.pop(key, None)
            if len(self._failures) > 10000:  # bounded memory under a flood of names
                self._failures.clear()

    def login(self, name: str, password: str, client: str) -> dict[str, Any]:
        """A token for ``name`` / ``password`` (``{"access_token": ..., "token_type": "bearer", ...}``)."""
        if self.store is None:
            raise AuthError("authentication is not enabled on this server", 404)
        key = (name[:128], client)
        self._throttle(key)
        user = self.store.verify(name, password)
        self._throttle(key, failed=user is None)
        if user is None:
            raise AuthError("wrong user name or password")
        now = int(time.time())
        token = jwt.encode({"sub": user.name, "iat": now, "exp": now + int(self.ttl_s)}, self._key, algorithm="HS256")
        return {"access_token": token, "token_type": "bearer", "expires_in": int(self.ttl_s), "role": user.role}

    def user(self, authorization: str | None) -> User:
        """The user of an ``Authorization: Bearer <token>`` header value.

        Raises:
            AuthError: 401 for a missing, malformed, expired or forged token or a removed user."""
        if self.store is None:
            return LOCAL_ADMIN
        if not authorization:
            raise AuthError("authentication required: log in with POST /auth/token and send the bearer token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        try:
            claims = jwt.decode(token.strip(), self._key, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired; log in again") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        user = self.store.user(str(claims["sub"]))
        if user is None:
            raise AuthError("the token's user no longer exists")
        return user

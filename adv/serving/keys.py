"""API keys: read from a YAML file and/or an environment variable, kept only as SHA-256 hashes.

File format (``sha256`` is preferred; a plain ``key`` is hashed on load and never kept)::

    keys:
      - {user: alice, sha256: 5e88...}        # role: user (the default)
      - {user: ops, key: "s3cret", role: admin}
      - {user: mallory, sha256: 9f86..., revoked: true}
      - {user: batch, sha256: 2c26..., rate: 1, burst: 5, quota: 1000}   # per-key limits

Environment variable (``ADV_SERVE_KEYS``): ``user=key,user2=key2`` (role user)
or ``admin:ops=key`` for an admin. The file is re-read when its modification
time or size changes (checked at most once a second), so adding or revoking a
key needs no restart.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adv.errors import ConfigError

ROLES = ("user", "admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    key: str | None = Field(None, min_length=8)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    role: Literal[ROLES] = "user"
    revoked: bool = False
    #: Per-key overrides of the endpoint's rate limit (requests/s, bucket size) and quota.
    rate: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    quota: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key entry for {self.user!r} needs exactly one of 'key' or 'sha256'")
        return self


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry]


@dataclass(frozen=True)
class Identity:
    user: str
    role: str
    revoked: bool
    limits: tuple[tuple[str, float], ...] = ()  # per-key rate-limit overrides


class KeyRing:
    """``ring.lookup(key) -> Identity | None`` over the hashes of the file's and the variable's keys."""

    def __init__(self, path: str | None = None, env: str | None = "ADV_SERVE_KEYS", *, check_every: float = 1.0,
                 entries: tuple[KeyEntry, ...] = ()):
        # ``entries``: keys given as values (hashed), e.g. a driver's $ADV_SERVE_KEYS handed to remote replicas
        self.path, self.env, self.check_every, self.entries = path, env, check_every, tuple(entries)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._ids: dict[str, Identity] = {}
        self.reload()
        if not self._ids:
            raise ConfigError(f"no API keys: give a key file ({path or 'none given'}) or set ${env}")

    def lookup(self, key: str) -> Identity | None:
        self._maybe_reload()
        return self._ids.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._ids)

    def reload(self) -> None:
        """Read the file and the variable again; a broken file keeps the previous keys (and says why)."""
        ids: dict[str, Identity] = {}
        for entry in [*self.entries, *self._env_entries(), *self._file_entries()]:
            digest = entry.sha256 or hash_key(entry.key)
            limits = tuple((k, v) for k in ("rate", "burst", "quota") if (v := getattr(entry, k)) is not None)
            ids[digest] = Identity(entry.user, entry.role, entry.revoked, limits)
        with self._lock:
            self._ids = ids

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.check_every:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            try:
                self.reload()
            except ConfigError:  # a half-written or broken file: keep serving with the previous keys
                pass

    def _file_entries(self) -> list[KeyEntry]:
        if self.path is None:
            return []
        self._stamp = _stamp(self.path)
        try:
            with open(self.path) as fh:
                raw = yaml.safe_load(fh)
            return KeyFile.model_validate(raw).keys
        except OSError as e:
            raise ConfigError(f"cannot read the key file {self.path}: {e.strerror}") from None
        except (yaml.YAMLError, ValidationError) as e:
            # never echo the file's content: it may hold plain keys
            raise ConfigError(f"{self.path}: not a valid key file ({type(e).__name__}, "
                              f"{len(getattr(e, 'errors', lambda: [])())} problem(s)); see adv.serving.keys") from None

    def _env_entries(self) -> list[KeyEntry]:
        return env_entries(self.env) if self.env else []


def env_entries(env: str) -> list[KeyEntry]:
    """The keys of the variable ``env`` (``user=key,admin:ops=key``), each as a hashed entry (no plain key kept)."""
    raw = os.environ.get(env, "")
    out = []
    for item in filter(None, (s.strip() for s in raw.split(","))):
        role, rest = ("admin", item[6:]) if item.startswith("admin:") else ("user", item)
        user, sep, key = rest.partition("=")
        if not sep:
            raise ConfigError(f"${env}: entries are user=key or admin:user=key, separated by commas")
        try:
            KeyEntry(user=user, key=key, role=role)  # the checks (user name, key length) of a file's entry
        except ValidationError:
            raise ConfigError(f"${env}: bad entry for user {user!r} (keys need >= 8 characters)") from None
        out.append(KeyEntry(user=user, sha256=hash_key(key), role=role))
    return out


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size

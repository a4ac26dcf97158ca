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

A key file that becomes unreadable or invalid while serving (deleted, half
written, a YAML error) is logged once per distinct problem, without its
content, and then handled by the policy ``on_error``:

* ``keep`` (the default): keep serving the last good keys until the file is
  valid again. Safe against a botched edit; a key removed by *deleting* the
  file stays valid, so revoke keys with ``revoked: true``, never by deletion.
* ``refuse``: accept no key from the file (only ``$ADV_SERVE_KEYS``'s) until
  it is valid again: fail closed, at the cost of an outage on a botched edit.

At start a broken file is always a one-line error (nothing to keep).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adv.errors import ConfigError

ROLES = ("user", "admin")
ON_ERROR = ("keep", "refuse")
log = logging.getLogger(__name__)


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
                 entries: tuple[KeyEntry, ...] = (), on_error: Literal[ON_ERROR] = "keep"):
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        # ``entries``: keys given as values (hashed), e.g. a driver's $ADV_SERVE_KEYS handed to remote replicas
        self.path, self.env, self.check_every, self.on_error = path, env, check_every, on_error
        self.entries = tuple(entries)
        self.problem: str | None = None  # the key file's current problem (logged once), None when it is good
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
        """Read the file and the variable again; raises :class:`ConfigError` on a broken file."""
        ids = self._entries_ids(self._env_entries() + self._file_entries())
        with self._lock:
            self._ids = ids

    @staticmethod
    def _entries_ids(entries: list[KeyEntry]) -> dict[str, Identity]:
        ids: dict[str, Identity] = {}
        for entry in entries:
            digest = entry.sha256 or hash_key(entry.key)
            limits = tuple((k, v) for k in ("rate", "burst", "quota") if (v := getattr(entry, k)) is not None)
            ids[digest] = Identity(entry.user, entry.role, entry.revoked, limits)
        return ids

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.check_every:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            try:
                self.reload()
            except ConfigError as e:  # a deleted, half-written or broken file: the policy decides
                self._broken(str(e))
                return
            if self.problem is not None:
                log.warning("API key file %s is valid again: %d keys loaded", self.path, len(self._ids))
                self.problem = None

    def _broken(self, problem: str) -> None:
        if problem != self.problem:  # once per distinct problem, not once per request
            then = ("keeping the last good keys" if self.on_error == "keep"
                    else "refusing every key from the file until it is valid")
            log.warning("%s; %s (keys_on_error=%s)", problem, then, self.on_error)
            self.problem = problem
        if self.on_error == "refuse":
            env = {}
            with contextlib.suppress(ConfigError):
                env = self._entries_ids(self._env_entries())
            with self._lock:
                self._ids = env

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
        # values handed over at construction count as the variable's: a broken key file keeps them too
        return [*self.entries, *(env_entries(self.env) if self.env else [])]


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

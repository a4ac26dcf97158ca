"""One registry class for every kind of named component: models, datasets, attacks, defenses, training losses.

A ``Registry[T]`` maps names to entries of one kind. Its rules are the same for all five kinds:

* registering a name twice is a programming error (``ValueError`` at import time);
* looking up an unknown name is a user error: ``ConfigError`` naming the closest known name ("did you mean") and
  the known ones, so the CLI and the jobs print it as one line;
* a name that was renamed stays in the registry's ``renamed`` map (old -> new), and using it is a ``ConfigError``
  that names the new one. Hyperparameters renamed inside one component (an attack's ``renamed``, a params
  model's ``renamed_keys``) go through the same :func:`check_renamed`.

Importing a component package (``adv.attacks``, ``adv.models``, ``adv.data``, ``adv.defenses``,
``adv.train.losses``) imports every module that registers into it, so a registry is full whenever it is looked up;
the registry itself never imports its components (that would close an import cycle).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from adv.errors import ConfigError

T = TypeVar("T")


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The known name nearest to a misspelt ``name`` (None when none is near)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def check_renamed(renamed: Mapping[str, str], given: Iterable[str], where: str) -> None:
    """ConfigError naming the new name of every former name in ``given`` (``where``: e.g. "attack 'cw'")."""
    old = sorted(set(given) & set(renamed))
    if old:
        raise ConfigError(f"{where}: " + ", ".join(f"{k!r} was renamed to {renamed[k]!r}" for k in old))


class Registry(Generic[T]):
    """Name -> entry for one ``kind`` of component ("attack", "defense", ...).

    ``known`` phrases the list of names in the unknown-name error (``{names}`` is replaced by them), e.g.
    "`adv train --defense` takes {names}"; ``renamed`` maps former names to current ones.
    """

    def __init__(self, kind: str, *, known: str = "known: {names}", renamed: Mapping[str, str] | None = None):
        self.kind = kind
        self.known = known
        self.renamed = dict(renamed or {})
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name) -> str:
        """The one-line message for a name that is not registered (for validators that wrap it)."""
        if isinstance(name, str) and name in self.renamed:
            return f"{self.kind} {name!r} was renamed to {self.renamed[name]!r}"
        near = closest(name, self._entries) if isinstance(name, str) else None
        hint = f"; did you mean {near!r}?" if near else ""
        return f"unknown {self.kind} {name!r}{hint}; " + self.known.format(names=", ".join(self.names()))

    def names(self, pattern: str = "*", where: Callable[[T], bool] | None = None) -> list[str]:
        """Sorted names matching the glob ``pattern`` whose entry satisfies ``where``."""
        return sorted(n for n, e in self._entries.items()
                      if fnmatch.fnmatch(n, pattern) and (where is None or where(e)))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

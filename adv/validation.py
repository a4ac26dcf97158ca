"""One-line messages from pydantic validation errors: the key path, the message, the bad value.

Every typed config (a job's YAML, a bundle's manifest, a detector's settings) is validated at the boundary;
this is the one place that turns pydantic's error list into the line a user reads. Also here: reading a config
file's YAML, and the budget values configs accept (a number, ``inf`` or a fraction such as ``8/255``).
"""

from __future__ import annotations

import math
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from pydantic import BaseModel, ValidationError

from adv.errors import ConfigError
from adv.registry import closest


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Sub``, ``Sub | None``, ``list[Sub]``, ``dict[str, Sub]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _names(field_name: str, info: Any) -> list[str]:
    alias = info.validation_alias
    choices = [c for c in getattr(alias, "choices", [alias]) if isinstance(c, str)] if alias else []
    return [field_name, *[c for c in choices if c != field_name]]


def _unknown_key_hint(model: type[BaseModel] | None, loc: tuple) -> str:
    """``; did you mean 'root'?`` (or which key an alias duplicates) for an unknown key at ``loc``."""
    for part in loc[:-1]:
        if model is None:
            return ""
        if isinstance(part, str):
            info = model.model_fields.get(part)
            model = _submodel(info.annotation) if info is not None else None
    if model is None or not loc or not isinstance(loc[-1], str):
        return ""
    key = loc[-1]
    names = {name: field for field, info in model.model_fields.items() for name in _names(field, info)}
    if key in names:  # an alias given beside its field: pydantic keeps the first and calls this one extra
        return f" ({key!r} and {names[key]!r} are one key; give it once)"
    near = closest(key, names)
    known = ", ".join(model.model_fields)
    return f"; did you mean {near!r}? (keys: {known})" if near else f" (keys: {known})"


def format_validation_error(exc: ValidationError, source: str = "", model: type[BaseModel] | None = None) -> str:
    """The first error as ``key.path: message (got value)``; an unknown key of ``model`` gets the nearest
    known one."""
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "tagged-")))]
    msg = err["msg"].removeprefix("Value error, ")
    key = _loc(tuple(loc))
    # Model-level validators put the key at the start of their message ("eps: ...").
    if ":" in msg.split(" ")[0] and key:
        key, msg = f"{key}.{msg.split(':', 1)[0]}", msg.split(":", 1)[1].strip()
    elif ":" in msg.split(" ")[0]:
        key, msg = msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
    got = err.get("input")
    shown = err["type"] not in ("value_error", "missing") and not isinstance(got, (dict, list))
    extra = f" (got {got!r})" if shown else ""
    if err["type"] == "extra_forbidden":
        msg, extra = "unknown key" + _unknown_key_hint(model, tuple(err["loc"])), ""
    prefix = f"{source}: " if source else ""
    return f"{prefix}{key or 'config'}: {msg}{extra}"


def validate_mapping(model: type[BaseModel], data: Any, source: str = "", error: type[Exception] = ConfigError) -> Any:
    """``model`` built from a YAML mapping; every error is one ``error`` line naming the key (any stage's config)."""
    if not isinstance(data, dict):
        raise error(f"{source or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(exc, source, model)) from None


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML; a missing, unparsable or empty file is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    return data


def parse_eps(v: Any) -> float:
    """A number, ``"inf"``, or a fraction such as ``"8/255"``."""
    if isinstance(v, bool):
        raise ValueError(f"eps must be a number, got {v!r}")
    if isinstance(v, str):
        text = v.strip().lower()
        try:
            v = math.inf if text in ("inf", "infinity") else float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps must be a number, 'inf' or a fraction like '8/255', got {v!r}") from None
    if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
        raise ValueError(f"eps must be >= 0, got {v!r}")
    return float(v)

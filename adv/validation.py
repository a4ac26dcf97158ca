"""One-line messages from pydantic validation errors: the key path, the message, the bad value.

Every typed config (a job's YAML, a bundle's manifest, a detector's settings) is validated at the boundary;
this is the one place that turns pydantic's error list into the line a user reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from adv.errors import ConfigError


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(exc: ValidationError, source: str = "") -> str:
    """The first error as ``key.path: message (got value)``."""
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
    extra = f" (got {got!r})" if err["type"] not in ("value_error", "missing") and not isinstance(got, (dict, list)) else ""
    if err["type"] == "extra_forbidden":
        msg, extra = "unknown key", ""
    prefix = f"{source}: " if source else ""
    return f"{prefix}{key or 'config'}: {msg}{extra}"


def validate_mapping(model: type[BaseModel], data: Any, source: str = "", error: type[Exception] = ConfigError) -> Any:
    """``model`` built from a YAML mapping; every error is one ``error`` line naming the key (any stage's config)."""
    if not isinstance(data, dict):
        raise error(f"{source or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(exc, source)) from None

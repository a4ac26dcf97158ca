"""Spec strings ``NAME:k=v,k=v`` and their typed parameters: the grammar every registry shares.

The defense-stage registry (:mod:`adv.defenses.registry`) and the training-loss
registry (:mod:`adv.train.registry`) both name a component and its
hyperparameters this way on the command line and in YAML; list values are
joined with ``+`` (``unet:attacks=fgsm+pgd``). Parameters are a pydantic model
per component, so a bad key or value fails with one line that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from adv.errors import ConfigError
from adv.registry import check_renamed


def parse_spec(text: str, what: str = "defense") -> tuple[str, dict[str, str]]:
    """``"dwt:wavelet=haar,level=1"`` -> ``("dwt", {"wavelet": "haar", "level": "1"})``.

    Values stay strings; the component's pydantic model coerces and validates them. Every spec string is
    parsed here, through :meth:`StageSpec.parse` (the registries' lookups included), once where it enters a
    process; the parsed :class:`StageSpec` travels from there on.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what} spec must be a non-empty string NAME[:k=v,...], got {text!r}")
    name, _, rest = text.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{what} spec {text!r}: expected k=v, got {item!r}")
        if key.strip() in params:
            raise ConfigError(f"{what} spec {text!r}: {key.strip()!r} given twice")
        params[key.strip()] = value.strip()
    return name.strip(), params


@dataclass(frozen=True)
class StageSpec:
    """A parsed spec: its name and its ``k=v`` parameters as written (strings, in order).

    Parsed once where a spec enters (a config, the command line, a bundle's manifest), or built from validated
    parameters (:meth:`canonical`), then passed on as it is; ``str(spec)`` is the spec string as
    written (what reports, manifests, labels and run keys print), and a spec changed on the object
    (:meth:`absolute`) prints in the ``NAME:k=v,k=v`` form. The component's pydantic model validates
    the values (:func:`build_params`).
    """

    name: str
    params: tuple[tuple[str, str], ...] = ()
    #: The text it was parsed from ("" when built or changed here): printed as the user wrote it.
    text: str = field(default="", compare=False, repr=False)

    @classmethod
    def parse(cls, text: "str | StageSpec", what: str = "defense") -> "StageSpec":
        if isinstance(text, StageSpec):
            return text
        name, params = parse_spec(text, what)
        return cls(name, tuple(params.items()), text)

    @classmethod
    def canonical(cls, name: str, params: BaseModel) -> "StageSpec":
        """The canonical spec of validated ``params``: only the values that differ from the defaults, in the
        model's field order (what sweeps, bundles and a stage's ``defense_spec`` print)."""
        defaults = type(params)()
        return cls(name, tuple((key, _spec_value(getattr(params, key))) for key in type(params).model_fields
                               if getattr(params, key) != getattr(defaults, key)))

    def __str__(self) -> str:
        return self.text or self.name + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.params).get(key, default)

    def absolute(self, key: str = "checkpoint") -> "StageSpec":
        """The spec with its file parameter ``key`` made absolute (a URI is kept): actors and trials need not
        share the driver's working directory."""
        return self._with_paths({key}, absolute_path)

    def under(self, root: str | os.PathLike, keys: Iterable[str]) -> "StageSpec":
        """The spec with its file parameters ``keys`` (paths relative to ``root``, as a bundle names its stage
        files) joined to ``root``; parameters that are absent or empty are kept."""
        return self._with_paths([k for k in keys if self.get(k)], lambda v: str(Path(root) / v))

    def _with_paths(self, keys: Iterable[str], change) -> "StageSpec":
        """The spec with ``change`` applied to those of its parameters ``keys`` that it has."""
        keys = {k for k in keys if self.get(k) is not None}
        if not keys:
            return self
        return replace(self, params=tuple((k, change(v) if k in keys else v) for k, v in self.params), text="")


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute (a URI or None unchanged)."""
    return path if path is None or "://" in path else os.path.abspath(path)


def build_params(model: type[BaseModel], raw: dict[str, Any] | BaseModel | None, where: str) -> BaseModel:
    """``model(**raw)`` with ``+``-joined lists and ``none`` understood; errors name ``where`` and the key."""
    if isinstance(raw, model):
        return raw
    values = dict(raw or {})
    for key, value in values.items():
        annotation = str(model.model_fields[key].annotation) if key in model.model_fields else ""
        if isinstance(value, str) and annotation.startswith(("list", "tuple")):
            values[key] = [v for v in value.split("+") if v]
        elif isinstance(value, str) and value.lower() in ("none", "null") and "None" in annotation:
            values[key] = None
    check_renamed(getattr(model, "renamed_keys", {}), values, where)
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(map(str, err["loc"])) or "params"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        raise ConfigError(f"{where}: {loc}: {err['msg']}{got}; "
                          f"known params: {', '.join(model.model_fields)}") from None


def format_spec(name: str, params: BaseModel) -> str:
    """The canonical spec string: only the values that differ from the defaults (:meth:`StageSpec.canonical`)."""
    return str(StageSpec.canonical(name, params))


def _spec_value(value: Any) -> str:
    """A parameter value as a spec writes it: lists joined with ``+``."""
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else f"{value}"


def params_schema(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """Every hyperparameter with its type, default and meaning (``adv info`` and the Tune search space)."""
    return {k: {"default": f.default, "type": _type_name(f.annotation), "description": f.description or ""}
            for k, f in model.model_fields.items()}


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")

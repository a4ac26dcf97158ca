"""Decorator registry of attacks, with their metadata as data (after timm's ``_registry``).

An ``AttackSpec`` is callable: ``get_attack("pgd")(model, x, y, eps=0.3)``
calls the attack with the spec's default hyperparameters, which are read
from the function's own keyword defaults (one source of truth) and may be
overridden by a *variant* (``apgd_dlr`` is ``apgd`` with ``loss="dlr"``).

Two families share one signature each:

* ``whitebox``: ``fn(model, x, y, *, eps, norm, targeted, y_target, **hyper) -> x_adv``
* ``query``: ``fn(oracle, x, y, *, eps, norm, ..., **hyper) -> (x_adv, n_queries)``,
  where ``oracle`` is a :class:`~adv.attacks.oracle.QueryOracle` (a plain
  model is wrapped into one) and ``n_queries`` is a (N,) tensor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from adv.attacks.oracle import QueryOracle
from adv.registry import Registry, check_renamed

FAMILIES = ("whitebox", "query")
#: Arguments of the common signature; everything else is a hyperparameter.
COMMON_ARGS = ("eps", "norm", "targeted", "y_target")


@dataclass(frozen=True)
class AttackSpec:
    name: str
    fn: Callable = field(repr=False)
    family: str
    norms: tuple[str, ...]
    targeted: bool
    description: str
    #: Hyperparameters and their defaults (the function's, updated by the variant).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Minimal-perturbation attacks (DeepFool, CW, HopSkipJump) accept eps=inf;
    #: a finite eps is a budget their result is projected onto.
    minimal: bool = False
    #: What a query attack's oracle returns: "probs" (score-based) or "labels".
    oracle: str | None = None
    #: Uses random numbers (takes ``seed=``).
    randomized: bool = False
    #: Needs a convolutional layer (Grad-CAM) in the model.
    needs_conv: bool = False
    #: Takes many steps (gradient or search); the report expects these to beat the one-step attacks.
    iterative: bool = False
    #: The joint classifier + detector loss can drive it (:func:`adv.evaluate.adaptive.detector_aware_attack`).
    detector_aware: bool = False
    #: Makes the training adversarials of learned stages (the U-Net of Himbitski et al. 2024).
    training: bool = False
    #: A3Attack can add its attention term to this attack's loss (Wu et al. 2022, AAD §4.3).
    a3_base: bool = False

    #: Hyperparameters renamed so that each name has one meaning: old name -> new name.
    renamed: Mapping[str, str] = field(default_factory=dict)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    def check_renamed(self, names: Iterable[str]) -> None:
        """ConfigError that names the new name of any former hyperparameter name in ``names``."""
        check_renamed(self.renamed, names, f"attack {self.name!r}")

    def __call__(self, model, x, y, **kwargs):
        self.check_renamed(kwargs)
        unknown = set(kwargs) - set(self.defaults) - set(COMMON_ARGS)
        if unknown:
            raise ValueError(f"attack {self.name!r} got unknown arguments {sorted(unknown)}; "
                             f"it takes {sorted(self.defaults)}")
        return self.fn(model, x, y, **{**self.defaults, **kwargs})

    def accepts(self, name: str) -> bool:
        return name in self.defaults or name in COMMON_ARGS

    def run(self, model, x, y, **kwargs):
        """``(x_adv, queries (N,) or None)`` of this attack on ``model`` (see :func:`call_family`)."""
        return call_family(self, self.family, model, x, y, oracle=self.oracle, **kwargs)


def call_family(fn: Callable, family: str, model, x, y, /, *, oracle: str | None = "probs", **kwargs):
    """The family dispatch: ``(x_adv, queries (N,) or None)``.

    A query attack gets a fresh counted :class:`~adv.attacks.oracle.QueryOracle`
    of ``model`` answering ``oracle`` ("probs" or "labels"); a white-box
    attack gets ``model`` itself and reports no queries.
    """
    if family == "query":
        return fn(QueryOracle(model, output=oracle or "probs"), x, y, **kwargs)
    return fn(model, x, y, **kwargs), None


#: Every attack and variant by name; importing :mod:`adv.attacks` registers them all.
ATTACKS: Registry[AttackSpec] = Registry("attack")


def _hyper_defaults(fn: Callable) -> dict[str, Any]:
    sig = inspect.signature(fn)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in COMMON_ARGS and p.default is not p.empty
    }


def register_attack(
    name: str,
    *,
    family: str,
    norms: tuple[str, ...],
    targeted: bool,
    description: str,
    minimal: bool = False,
    oracle: str | None = None,
    needs_conv: bool = False,
    iterative: bool = False,
    detector_aware: bool = False,
    training: bool = False,
    a3_base: bool = False,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    variant_meta: Mapping[str, Mapping[str, Any]] | None = None,
    renamed: Mapping[str, str] | None = None,
):
    """Register an attack function under ``name``.

    ``variants`` maps further names to default overrides; ``variant_meta``
    overrides a variant's metadata (e.g. ``randomized=False`` when the
    variant's defaults make the seed irrelevant). ``renamed`` maps former
    hyperparameter names to the current ones: passing an old name is an
    error that names the new one.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def wrap(fn: Callable) -> Callable:
        base = _hyper_defaults(fn)
        for vname, overrides in {name: {}, **(variants or {})}.items():
            bad = set(overrides) - set(base)
            if bad:
                raise ValueError(f"variant {vname!r} overrides unknown hyperparameters {sorted(bad)}")
            meta = dict(
                name=vname, fn=fn, family=family, norms=tuple(norms), targeted=targeted,
                description=description if vname == name else f"{description} ({_fmt(overrides)})",
                defaults=MappingProxyType({**base, **overrides}), minimal=minimal, oracle=oracle,
                randomized="seed" in base, needs_conv=needs_conv, iterative=iterative,
                detector_aware=detector_aware, training=training, a3_base=a3_base,
                renamed=MappingProxyType(dict(renamed or {})),
            )
            ATTACKS.add(vname, AttackSpec(**{**meta, **(variant_meta or {}).get(vname, {})}))
        return fn

    return wrap


def _fmt(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items())


def get_attack(name: str) -> AttackSpec:
    """The registered attack (ConfigError naming the closest one when there is none)."""
    return ATTACKS.get(name)


def describe_attack(name: str) -> str:
    """One line for listings: description, family, norms."""
    spec = get_attack(name)
    return f"{spec.description} [{spec.family}; {'/'.join(spec.norms)}{'; targeted' if spec.targeted else ''}]"


#: Metadata ``list_attacks`` filters on (timm's ``list_models(filter=...)``, with the metadata as data).
FILTERS = ("family", "minimal", "oracle", "randomized", "needs_conv", "iterative", "detector_aware", "training",
           "a3_base")


def list_attacks(pattern: str = "*", **meta) -> list[str]:
    """Registered names matching ``pattern`` whose metadata equal ``meta`` (None: any), e.g.
    ``list_attacks(iterative=True)`` or ``list_attacks(family="query")``."""
    bad = set(meta) - set(FILTERS)
    if bad:
        raise ValueError(f"cannot filter attacks by {sorted(bad)}; filters: {', '.join(FILTERS)}")
    if meta.get("family") is not None and meta["family"] not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {meta['family']!r}")
    meta = {k: v for k, v in meta.items() if v is not None}
    return ATTACKS.names(pattern, where=lambda s: all(getattr(s, k) == v for k, v in meta.items()))

"""The Parquet row contract of the evaluation job: one owner for names, tracks and columns.

One row per (example, defense, track, grid point); docs/parquet-schema.md
explains each column. The grid worker (:mod:`adv.evaluate.worker`) writes these
rows, ``jobs.evaluate`` stores them, and the report (:mod:`adv.evaluate.report`)
reads them back.
"""

from __future__ import annotations

import pyarrow as pa

from adv.errors import InputError

#: The ``defense`` label of the undefended classifier.
NONE = "none"
#: ``clean``: the clean image; ``non-adaptive``: crafted on the undefended model, then fed through the defense;
#: ``adaptive``: crafted on (or queried from) the defended pipeline itself.
TRACKS = ("clean", "non-adaptive", "adaptive")
#: Track names as the report prints them; "any" is the per-example worst over both attack tracks.
TRACK_LABEL = {"clean": "clean", "non-adaptive": "non-adaptive", "adaptive": "adaptive", "any": "worst of both"}
TRACK_ORDER = {t: i for i, t in enumerate((*TRACKS, "any"))}
#: Optional per-row features (``logits``, ``features``, ``cam`` columns).
FEATURES = ("logits", "penultimate", "gradcam")
#: Columns every input batch carries (``image`` aside).
KEY_COLUMNS = ("index", "label", "shard", "chunk")

#: The result rows: column -> Arrow type as stored. Tensor columns are fixed-shape
#: (ArrowTensorTypeV2); ``logits``/``features``/``cam`` only with those features,
#: ``image`` only with ``store_images``.
ROW_SCHEMA = {
    "index": "int64", "label": "int64", "shard": "int64", "chunk": "int64",
    "defense": "string", "track": "string", "grid": "int32", "attack": "string", "attack_key": "string",
    "norm": "string", "eps": "double", "steps": "int64", "queries": "int64", "gen_seconds": "double",
    "l0": "float", "l2": "float", "linf": "float", "mse": "float", "ssim": "float", "psnr": "float",
    "pred": "int64", "correct": "bool", "detected": "bool", "robust": "bool", "success": "bool",
    "logits": "tensor float32 (K,)", "features": "tensor float32 (D,)", "cam": "tensor float32 (h, w)",
    "image": "tensor float32 (C, H, W)",
}
#: Columns that describe the attack and the adversarial itself, independent of the defense that scored it:
#: a stored run's non-adaptive rows pass them through unchanged when a new defense is scored.
ATTACK_COLUMNS = ("index", "label", "shard", "chunk", "track", "grid", "attack", "attack_key", "norm", "eps",
                  "steps", "queries", "gen_seconds", "l0", "l2", "linf", "mse", "ssim", "psnr")
#: Scalar columns the report reads for every row (images, features and logits are read selectively).
SCALAR_COLUMNS = tuple(k for k, v in ROW_SCHEMA.items() if not v.startswith("tensor") and k != "chunk")

_ARROW = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(), "double": pa.float64(),
          "float": pa.float32(), "bool": pa.bool_()}
#: The scalar columns as an Arrow schema: what every writer stores and every reader checks.
ARROW_SCHEMA = pa.schema([pa.field(k, _ARROW[v]) for k, v in ROW_SCHEMA.items() if not v.startswith("tensor")])
#: Ray's fixed-shape tensor columns (extension type ``ray.data.arrow_tensor_v2``, list storage plus its shape).
TENSOR_COLUMNS = tuple(k for k, v in ROW_SCHEMA.items() if v.startswith("tensor"))
#: Columns every result row has (the others depend on features and store_images).
REQUIRED_COLUMNS = tuple(ARROW_SCHEMA.names)


def check_schema(schema: pa.Schema, where: str, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Refuse a table or file whose columns are not the row schema: one line naming ``where`` and the column."""
    for f in schema:
        if f.name in ARROW_SCHEMA.names:
            expected = ARROW_SCHEMA.field(f.name).type
            if f.type != expected:
                raise InputError(f"{where}: column {f.name!r} is {f.type}, the row schema says {expected}")
        elif f.name in TENSOR_COLUMNS:
            storage = getattr(f.type, "storage_type", f.type)
            if not pa.types.is_list(storage) and not pa.types.is_large_list(storage) \
                    and not pa.types.is_fixed_size_list(storage):
                raise InputError(f"{where}: column {f.name!r} is {f.type}, the row schema says a tensor column")
        else:
            raise InputError(f"{where}: column {f.name!r} is not in the row schema (docs/parquet-schema.md)")
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise InputError(f"{where}: column {missing[0]!r} is missing (the row schema, docs/parquet-schema.md)")

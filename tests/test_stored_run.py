"""The run folder's contract without Ray: the enforced row schema, the one stored-run reader, parsed stage specs."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adv.errors import AdvError, ConfigError, InputError
from adv.runs.rows import ARROW_SCHEMA, check_schema
from adv.runs.store import RunStore
from adv.runs.stored import StoredRun
from adv.specs import StageSpec
from tests.pipeline_helpers import REPO


def _rows(n: int = 4, **change) -> pa.Table:
    """``n`` rows of the undefended classifier (clean, then non-adaptive), every scalar column of the schema."""
    values = {"index": np.arange(n) // 2, "label": np.full(n, 3), "shard": np.zeros(n, np.int64),
              "chunk": np.arange(n) // 2, "defense": ["none"] * n, "track": ["clean", "non-adaptive"] * (n // 2),
              "grid": np.zeros(n, np.int32), "correct": np.ones(n, bool)}
    cols = {}
    for f in ARROW_SCHEMA:
        raw = values.get(f.name, ["x"] * n if pa.types.is_string(f.type) else np.zeros(n))
        cols[f.name] = pa.array(raw, type=f.type)
    cols.update(change)
    return pa.table(cols)


def test_a_part_with_a_wrong_column_type_is_refused_naming_the_file_and_the_column(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert store.write_part(0, _rows(), attempt=1).endswith("a0001-i00000000.parquet")
    with pytest.raises(InputError, match=r"a0002-i00000000\.parquet: column 'label' is string, the row schema says "
                                         r"int64"):
        store.write_part(0, _rows(label=pa.array(["3"] * 4)), attempt=2)
    with pytest.raises(InputError, match="column 'colour' is not in the row schema"):
        store.write_part(0, _rows().append_column("colour", pa.array([1] * 4)), attempt=3)
    with pytest.raises(InputError, match="column 'grid' is missing"):
        store.write_part(0, _rows().drop_columns(["grid"]), attempt=4)


def test_the_reader_checks_each_file_and_keeps_the_undefended_non_adaptive_rows(tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    rows = pa.concat_tables([_rows(), _rows(2, defense=pa.array(["dwt"] * 2)),
                             _rows(2, track=pa.array(["adaptive"] * 2))])
    pq.write_table(rows, run / "shards/shard-00000.parquet")
    RunStore(str(run)).write_json("layout.json", {"n": 2, "chunk_size": 1, "chunk_shard": [0, 0], "classes": [],
                                                  "source": "digits"})
    chunks = list(StoredRun(str(run)).reusable_chunks())
    assert [c["chunk"].tolist() for c in chunks] == [[0, 0], [1, 1]]
    assert all(set(c["defense"]) == {"none"} and "adaptive" not in set(c["track"]) for c in chunks)
    pq.write_table(rows.set_column(rows.schema.get_field_index("eps"), "eps", pa.array(["0.1"] * 8)),
                   run / "shards/shard-00000.parquet")
    with pytest.raises(AdvError, match=r"shard-00000\.parquet: column 'eps' is string"):
        list(StoredRun(str(run)).reusable_chunks())
    check_schema(rows.schema, "ok")  # the table as written is the schema


def _spec_strings() -> set[str]:
    """Every literal defense/loss spec with parameters in the shipped configs and the tests (f-strings aside)."""
    text = "\n".join(p.read_text() for p in [*REPO.glob("jobs/configs/*.yaml"), *REPO.glob("tests/*.py")])
    found = set(re.findall(r"[\"'\[ ]([a-z][a-z0-9_]*:[a-z_]+=[^\"'\]{}\n]*)[\"'\]]", text))
    return {s for s in found if "{" not in s}


def test_a_parsed_spec_prints_as_written_and_a_changed_one_in_the_canonical_form():
    specs = _spec_strings()
    assert {"dwt:wavelet=haar,level=1", "initial_ae:checkpoint=runs/main/fashion-mnist-lenet/initial_ae.pt",
            "dwt:wavelet=db4, level=2"} <= specs
    parsed_all = 0
    for s in specs:
        try:
            parsed = StageSpec.parse(s)
        except ConfigError:  # the grammar's own bad-input cases ("dwt:level=1,level=2")
            continue
        parsed_all += 1
        assert str(parsed) == s and StageSpec.parse(parsed) is parsed
        canonical = str(StageSpec(parsed.name, parsed.params))
        assert StageSpec.parse(canonical) == parsed  # equal by name and params, whatever the spacing
    assert parsed_all > 30
    moved = StageSpec.parse("initial_ae:checkpoint=m/ae.pt, epochs=1").absolute()
    assert str(moved).startswith("initial_ae:checkpoint=/") and str(moved).endswith("/m/ae.pt,epochs=1")
    assert StageSpec.parse("dwt").absolute() == StageSpec("dwt") and str(StageSpec("dwt")) == "dwt"
    assert StageSpec.parse("x:checkpoint=s3://b/ae.pt").absolute().get("checkpoint") == "s3://b/ae.pt"

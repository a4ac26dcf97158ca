# The two entry points the README gives; each installs what it needs first.
.PHONY: main test bootstrap data

bootstrap:
	@bash scripts/bootstrap.sh

data:
	@bash scripts/get-data.sh

# The main job on an embedded local Ray cluster: train if needed, evaluate, write the report.
main: bootstrap data
	@.venv/bin/python -m jobs.main

test: bootstrap data
	@ADV_NO_PROGRESS=1 .venv/bin/python -m pytest -q
	@# the simulated multi-node cluster cannot share a process with the local cluster above
	@ADV_NO_PROGRESS=1 .venv/bin/python -m pytest -q -m multinode tests/test_pipeline_cluster.py

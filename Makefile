# Two commands: `make run` (execute the notebooks headless) and `make test` (the test suite).
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run run-quick test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch pinned first so nothing pulls the multi-GB CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	# the ray extra so CI runs tests/test_ray_vector_env.py (they skip, with the reason, without it)
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	$(PY) -m ipykernel install --sys-prefix --name esper-lib --display-name "Python (esper-lib)" > /dev/null
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	MPLBACKEND=Agg $(PY) -m esper_lib.notebook_runner

run-quick: $(STAMP)
	MPLBACKEND=Agg $(PY) -m esper_lib.notebook_runner --quick

test: $(STAMP)
	# loadgroup sends the Ray tests (xdist_group "ray") to one worker, so one local Ray instance starts.
	# pytest-xdist 3.8 ignores the group under pytest 9 (it behaves as --dist load): each worker that
	# gets Ray tests then starts its own local instance (ray.init(address="local")), which also works.
	MPLBACKEND=Agg $(PY) -m pytest -n 2 --dist loadgroup --durations=15

bench: $(STAMP)
	$(PY) benchmarks/bench_network.py

clean:
	rm -rf artefacts .pytest_cache

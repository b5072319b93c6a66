# Two commands: `make run` (execute the notebooks headless) and `make test` (the test suite).
# Each creates .venv and installs the project on first use. `make help` lists every target.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where pip finds torch. Empty: plain `pip install torch==2.13.0`, which on an ordinary Linux
# machine is the CUDA build (several GB). For the CPU build from the PyTorch index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: help run run-quick test bench lab tensorboard install clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: TORCH_INDEX=<pip index for torch> (e.g. https://download.pytorch.org/whl/cpu), PYTHON=$(PYTHON)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from TORCH_INDEX when set (the pin alone does not pick the CPU build)
	$(PY) -m pip install --quiet $(TORCH_INDEX_ARG) "torch==2.13.0"
	# --- install lines (the ray extra so CI runs tests/test_ray_vector_env.py; they skip, with the reason, without it) ---
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	# --- end of install lines ---
	$(PY) -m ipykernel install --sys-prefix --name esper-lib --display-name "Python (esper-lib)" > /dev/null
	touch $(STAMP)

install: $(STAMP) ## create .venv, install torch, the project and the Jupyter kernel "esper-lib"

run: $(STAMP) ## execute notebooks 01-04 and 03 on the trained checkpoint into artefacts/<run>/ (ARGS="-p updates 100 ...")
	$(PY) -m esper_lib.notebooks.runner $(ARGS)

run-quick: $(STAMP) ## the same with each notebook's quick parameters (seconds per notebook)
	$(PY) -m esper_lib.notebooks.runner --quick $(ARGS)

test: $(STAMP) ## run the whole test suite (notebooks included) on 2 workers
	MPLBACKEND=Agg $(PY) -m pytest -n 2 --dist loadgroup --durations=15

bench: $(STAMP) ## benchmarks: get_action plain vs fused, update fp32 vs bf16 autocast (network and PPO), env throughput (torch path vs C kernels)
	$(PY) benchmarks/bench_network.py
	$(PY) benchmarks/bench_ppo.py --compare
	$(PY) benchmarks/bench_env.py --steps 20 --native both

lab: $(STAMP) ## start JupyterLab in notebooks/ (pick the kernel "Python (esper-lib)")
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

tensorboard: $(STAMP) ## install the tensorboard extra and serve the logs of training runs under artefacts/ (notebook 04 with -p tensorboard true)
	$(PY) -m pip install --quiet -e ".[tensorboard]"
	$(VENV)/bin/tensorboard --logdir artefacts

clean: ## remove artefacts/ and pytest caches
	rm -rf artefacts .pytest_cache

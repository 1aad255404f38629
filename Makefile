# tdd_lightning: `make train` and `make test` are all a newcomer needs; both install on first use.
# GPU users: `make install TORCH="torch==<ver> --index-url <your CUDA wheel index>"`, or create .venv
# with your own torch (`VENV_FLAGS=--system-site-packages TORCH=`); see README "Install".

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
VENV_FLAGS  ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.install.stamp
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.DEFAULT_GOAL := help
.PHONY: help install train toy-data bench-toy test test-slow lint format tiny-model shapes notebooks sweep clean \
	toy-flow-teacher toy-flow-headroom toy-flow-data train-flow

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q $(TORCH); fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with dev extras (once; stamp-guarded)

TOY_SHAPES  := data/shapes/two/info.json
TOY_CACHE   := data/cache/toy-teacher/train/meta.json
TOY_FLOW_CACHE := data/cache/toy-flow-teacher/train/meta.json

train: $(STAMP) $(TOY_CACHE) ## the main job: CPU toy distillation of models/toy-teacher (experiment=toy_tdd)
	$(PY) -m tdd_lightning.toy.warm experiment=toy_tdd $(ARGS)   # the teacher's cells, once per machine
	$(PY) train.py experiment=toy_tdd $(ARGS)

$(TOY_SHAPES): | $(STAMP)
	$(PY) data/make_shapes.py --out data/shapes/two --difficulty two

$(TOY_CACHE): $(TOY_SHAPES) | $(STAMP)
	$(PY) -m tdd_lightning.data.encode "data/shapes/two/train/shard-*.tar" data/cache/toy-teacher/train \
		--model models/toy-teacher --resolution 32 --batch-size 256 --num-workers 1 --overwrite

toy-data: $(TOY_CACHE) ## the two-object shapes data and its latent cache for the toy teacher (once)

$(TOY_FLOW_CACHE): $(TOY_SHAPES) | $(STAMP)
	$(PY) -m tdd_lightning.data.encode "data/shapes/two/train/shard-*.tar" data/cache/toy-flow-teacher/train \
		--model models/toy-flow-teacher --resolution 32 --batch-size 256 --num-workers 1 --overwrite

toy-flow-data: $(TOY_FLOW_CACHE) ## the shapes data's latent cache for the toy flow teacher (once)

train-flow: $(STAMP) $(TOY_FLOW_CACHE) ## the flow-matching toy: TDD on models/toy-flow-teacher (experiment=toy_flux_tdd)
	$(PY) train.py experiment=toy_flux_tdd $(ARGS)

bench-toy: $(STAMP) $(TOY_CACHE) ## TDD/LCM/TCD/PCM x 2 seeds (toy_tdd_long) + the ablation sweeps -> docs/results/toy.md (~7 h on 2 cores; resumes)
	$(PY) -m tdd_lightning.toy.bench $(ARGS)

test: $(STAMP) ## the default test suite (fast; slow tests excluded)
	$(PY) -m pytest $(ARGS)

test-slow: $(STAMP) ## only the slow tests (DDP, notebooks, long runs)
	$(PY) -m pytest -m slow $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff fix + format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tiny-model: $(STAMP) ## write a tiny random SDXL-shaped pipeline to artifacts/tiny-sdxl
	$(PY) -m tdd_lightning.models.tiny artifacts/tiny-sdxl

toy-flow-teacher: $(TOY_SHAPES) | $(STAMP) ## rebuild models/toy-flow-teacher (tiny FLUX, rectified flow, 3 stages; ~85 min on 2 cores)
	$(PY) -m tdd_lightning.toy.build_flow_teacher --data data/shapes/two --out artifacts/toy-flow-teacher-stage1 \
		--heads 4 --steps 2400 --lr 6e-4 --seed 0 --no-progress $(ARGS)
	$(PY) -m tdd_lightning.toy.build_flow_teacher --data data/shapes/two --out artifacts/toy-flow-teacher-stage2 \
		--init artifacts/toy-flow-teacher-stage1 --steps 1800 --lr 4e-4 --seed 1 --no-progress $(ARGS)
	$(PY) -m tdd_lightning.toy.build_flow_teacher --data data/shapes/two --out models/toy-flow-teacher \
		--init artifacts/toy-flow-teacher-stage2 --steps 2400 --lr 4e-4 --seed 2 --no-progress $(ARGS)

toy-flow-headroom: $(TOY_SHAPES) | $(STAMP) ## the flow teacher's Euler 50/8/4/2/1 steps x CFG 1/2/3, n=1000 (~25 min)
	$(PY) -m tdd_lightning.toy.flow_headroom --teacher models/toy-flow-teacher --steps 50 8 4 2 1 \
		--guidance 1 2 3 --n 1000 --seed 0 --out logs/toy_flow_headroom.json $(ARGS)

SWEEP_DIR   := logs/toy_tdd/multiruns/example

sweep: $(STAMP) $(TOY_CACHE) ## example multirun: 2x2 sweep of short toy runs (~15 min CPU), then a report table
	$(PY) train.py -m experiment=toy_tdd trainer.max_steps=200 callbacks.toy_eval.n=500 callbacks.toy_eval.etas=[0.2] '~callbacks.toy_curves' \
		target_selection.s_ratio=0.0,0.3 guidance.p_empty=0.0,0.2 hydra.sweep.dir=$(SWEEP_DIR)
	$(PY) -m tdd_lightning.training.sweep_report $(SWEEP_DIR) --metrics train/loss eval/prompt_acc/4steps_eta0.2 \
		eval/fd/4steps_eta0.2 global_step

clean: ## remove run outputs (logs/), built models and caches (artifacts/), tool caches (keeps .venv, data/)
	rm -rf logs artifacts wandb lightning_logs .pytest_cache .ruff_cache

.PHONY: bench-data
shapes: $(STAMP) ## build the toy shapes dataset (one- and two-object scenes) into data/shapes/
	$(PY) data/make_shapes.py --out data/shapes/one --difficulty one $(ARGS)
	$(PY) data/make_shapes.py --out data/shapes/two --difficulty two $(ARGS)

bench-data: $(STAMP) ## loader samples/s from cached shards vs what toy training consumes (>= 10x)
	$(PY) -m tdd_lightning.data.bench $(ARGS)

notebooks: $(STAMP) ## execute notebooks/*.ipynb headless (nbclient); executed copies in logs/notebooks/
	$(PY) notebooks/execute.py --out logs/notebooks

.PHONY: bench
bench: $(STAMP) ## training-step benchmark: phases, compute floor, naive baseline (tiny model, CPU, < 3 min)
	$(PY) -m tdd_lightning.bench $(ARGS)

# The prepared GPU check (issue 19; docs/performance.md "Device check"). No .venv needed: a lent GPU
# machine starts bare, so these run with .venv's python where there is one, else python3.
DEVICE      ?= cuda
DEVICE_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: device-check device-wheels
device-check: ## GPU check (install, pytest -m gpu, SDXL bench, toy) -> logs/device-check/; DEVICE=cpu: rehearsal
	$(DEVICE_PY) -m tdd_lightning.bench.device_check --device $(DEVICE) $(ARGS)

device-wheels: ## download the wheels the GPU image lacks (Python 3.12) into .device-wheels/, dry-install them
	$(DEVICE_PY) -m tdd_lightning.bench.device_wheels $(ARGS)

# GTR toolkit — the user's interface. Every target takes CONFIG=, OUT=, SOURCE= and ARGS="key=value ...".
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
OUT ?= work
SOURCE ?=
ARGS ?=
CKPT ?= $(OUT)/runs/mesh
STAGE_ARGS = --config $(CONFIG) --out $(OUT) $(if $(SOURCE),--source $(SOURCE),) $(ARGS)
SETUP_STAMP := $(VENV)/.setup-$(shell cat requirements.txt | sha256sum | cut -c1-12)

.PHONY: setup data render render-eval shards train-nerf train-mesh reconstruct eval report validate-glb tools demo test test-fast bench gpu-check lint clean-venv help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(SETUP_STAMP)  ## create .venv with the pinned dependencies and the offline LPIPS weights (idempotent)

$(SETUP_STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (bpy 5.0.1 needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m training.lpips_weights fetch
	@rm -f $(VENV)/.setup-* && touch $@

data: setup  ## filter + download (or generate / link) assets -> OUT/manifest/{filter,download}.parquet, OUT/assets/
	$(PY) -m pipelines.data $(STAGE_ARGS)

render: setup  ## render every ok asset (renderers holding bpy: render.executor=ray|process|local) -> OUT/renders/<uid>/
	$(PY) -m pipelines.render $(STAGE_ARGS)

render-eval: setup  ## build the eval set of SOURCE (orbit + 4 input views) -> OUT/evalsets/<slug>/renders_eval/
	$(PY) -m pipelines.evalset $(STAGE_ARGS)

shards: setup  ## pack rendered assets into WebDataset shards -> OUT/shards/
	$(PY) -m pipelines.shards $(STAGE_ARGS)

train-nerf: setup  ## stage 1: NeRF training -> OUT/runs/nerf/
	$(PY) -m training.train_nerf $(STAGE_ARGS)

train-mesh: setup  ## stage 2: mesh training from stage 1 -> OUT/runs/mesh/
	$(PY) -m training.train_mesh $(STAGE_ARGS)

reconstruct: setup  ## posed images -> textured GLB in OUT/reconstruct/<asset>/ (INPUT=<folder> [CKPT=<step-N/, run folder or ckpt.pth>])
	@test -n "$(INPUT)" || { echo "error: give INPUT=<folder of posed images> (see README, 'Reconstruct')"; exit 2; }
	$(PY) -m training.reconstruct --input $(INPUT) --checkpoint $(CKPT) $(STAGE_ARGS)

eval: render-eval  ## build the eval set of SOURCE (render-eval), reconstruct it and score it -> OUT/eval/report.md
	$(PY) -m eval.run $(STAGE_ARGS)

report: setup  ## static HTML report of a run (stages, renders, curves, eval table, 3D views) -> OUT/report/index.html
	$(PY) -m eval.html_report $(STAGE_ARGS)

tools: tools/node_modules/.package-lock.json  ## Node tools (glTF validator, 3D viewer, browser driver) -> tools/node_modules

tools/node_modules/.package-lock.json: tools/package.json tools/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm not found (apt-get install -y nodejs npm)"; exit 1; }
	cd tools && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund

validate-glb: tools  ## every GLB of a run through the Khronos glTF validator (zero errors required)
	@files="$$(ls $(OUT)/eval/meshes/*.glb $(OUT)/reconstruct/*/*.glb 2>/dev/null)"; \
	test -n "$$files" || { echo "error: no GLB under $(OUT)/eval/meshes or $(OUT)/reconstruct"; exit 2; }; \
	node tools/gltf_validate.mjs $$files

demo: setup  ## the whole chain on procedural data, demo config, CPU
	$(PY) -m pipelines.demo $(STAGE_ARGS)

test: setup  ## the test suite (what .ci/run calls)
	$(PY) -m pytest tests -q

test-fast: setup  ## tests without Blender / Ray / slow ones
	$(PY) -m pytest tests -q -m "not blender and not ray and not slow"

bench: setup  ## benchmarks: table printed, OUT/bench/results.json
	$(PY) -m bench.run $(STAGE_ARGS)

gpu-check:  ## CUDA tests + GPU benchmarks on a GPU machine (see README "GPU check")
	bash bench/gpu_check.sh

lint: setup  ## ruff + the layer contracts (import-linter, pyproject [tool.importlinter])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean-venv:  ## remove .venv (the next target recreates it)
	rm -rf $(VENV)

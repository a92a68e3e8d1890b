# Two commands on a fresh machine with nothing but Python >= 3.11:
#   make demo   create the environment, run the pipeline on bundled data, print where it is
#   make test   create the environment, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test env bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m silverlabel.demo $(if $(DEMO_DIR),--out $(DEMO_DIR),) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest src tests -q

bench: $(STAMP)
	$(PY) bench/ingest.py --markdown BENCHMARKS.md

clean:
	rm -rf $(VENV) demo-output examples-output .pytest_cache

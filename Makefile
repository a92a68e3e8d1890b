# Two commands on a fresh machine with nothing but Python >= 3.11:
#   make demo   create the environment, run the pipeline on bundled data, print where it is
#   make test   create the environment, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# img2dataset in its own venv (it pins and pulls albumentations, pandas, wandb): the tests
# ingest outputs img2dataset itself wrote, and bench/ingest.py times it. Wheels only; it
# needs Python <= 3.12 (it imports imghdr): I2D_PYTHON, else the first of these that is.
I2D_VENV   := bench/.venv-img2dataset
I2D_STAMP  := $(I2D_VENV)/.installed
I2D_PYTHON ?= $(firstword $(foreach p,$(PYTHON) python3.12 python3.11 python3.10,$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; sys.exit(sys.version_info >= (3, 13))' 2>/dev/null && echo $(p))))

.PHONY: demo test env img2dataset-env bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

env: $(STAMP)

$(I2D_STAMP): bench/requirements-img2dataset.txt
	@test -n "$(I2D_PYTHON)" || { echo "img2dataset needs Python <= 3.12 (it imports imghdr); set I2D_PYTHON=python3.12" >&2; exit 1; }
	$(I2D_PYTHON) -m venv --clear $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install -q --disable-pip-version-check --only-binary=:all: -r bench/requirements-img2dataset.txt
	NO_ALBUMENTATIONS_UPDATE=1 $(I2D_VENV)/bin/python -c "import img2dataset"
	touch $(I2D_STAMP)

img2dataset-env: $(I2D_STAMP)

demo: $(STAMP)
	$(PY) -m silverlabel.demo $(if $(DEMO_DIR),--out $(DEMO_DIR),) $(DEMO_ARGS)

test: $(STAMP) $(I2D_STAMP)
	$(PY) -m pytest src tests -q

bench: $(STAMP)
	$(PY) bench/ingest.py --markdown BENCHMARKS.md

clean:
	rm -rf $(VENV) demo-output examples-output .pytest_cache

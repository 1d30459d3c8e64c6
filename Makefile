# nfapi: `make run` starts the server (and, once written, a worker); `make test` runs the tests.
PYTHON ?= python3
CONFIG ?= example-config.json
DATA ?= nfapi-data
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test

run:
	$(PYTHON) nfapi.py --config $(CONFIG) --data $(DATA) --host $(HOST) --port $(PORT)

test:
	$(PYTHON) -m pytest -q tests


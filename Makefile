# nfapi. `make run`: server + one worker (Ctrl-C stops both). `make test`: the test suite.
PYTHON ?= python3
CONFIG ?= example-config.json
DATA ?= nfapi-data
HOST ?= 127.0.0.1
PORT ?= 8000
NEXTFLOW ?= nextflow
SLOTS ?= 1

.PHONY: run demo test bench soak

# The worker reads the token from $NFAPI_TOKEN when set, else from the file the server creates.
run:
	@$(PYTHON) nfapi.py --config $(CONFIG) --data $(DATA) --host $(HOST) --port $(PORT) & server=$$!; \
	trap 'kill $$server $$worker 2>/dev/null' INT TERM; \
	while [ -z "$$NFAPI_TOKEN" ] && [ ! -s $(DATA)/api-token ]; do kill -0 $$server 2>/dev/null || exit 1; sleep 0.1; done; \
	$(PYTHON) nfapi_worker.py --server http://$(HOST):$(PORT) --slots $(SLOTS) --nextflow $(NEXTFLOW) \
	  $(if $(NFAPI_TOKEN),,--token-file $(DATA)/api-token) & worker=$$!; \
	wait $$server; status=$$?; kill $$worker 2>/dev/null; wait $$worker; exit $$status

# A run end to end without Nextflow: server + worker with tests/fake_nextflow.py, driven by examples/walkthrough.sh.
demo:
	@echo "make demo: runs use tests/fake_nextflow.py, a STAND-IN for Nextflow used by the tests (it runs no real pipeline)."
	@rm -rf demo-data; \
	$(PYTHON) nfapi.py --config $(CONFIG) --data demo-data --port 8765 --quiet & server=$$!; \
	trap 'kill $$server $$worker 2>/dev/null' INT TERM EXIT; \
	while [ ! -s demo-data/api-token ]; do kill -0 $$server 2>/dev/null || exit 1; sleep 0.1; done; \
	env -u NFAPI_TOKEN FAKE_NF_TASK_SECONDS=1 $(PYTHON) nfapi_worker.py --server http://127.0.0.1:8765 \
	  --nextflow tests/fake_nextflow.py --token-file demo-data/api-token & worker=$$!; \
	env -u NFAPI_TOKEN examples/walkthrough.sh http://127.0.0.1:8765 demo-data/api-token; \
	echo "console.log of the run:"; cat demo-data/runs/1/console.log

test:
	$(PYTHON) -m pytest -q tests

# Benchmarks (not part of `make test`): one markdown table, each figure against a baseline of the same run.
# The weblog's peer (Flask + gunicorn) runs from bench/.venv, which bench/run.py makes from bench/requirements.txt.
bench:
	$(PYTHON) bench/run.py

# A longer fuzzing soak (not part of `make test`): ten times the examples, a seed of your choice.
soak:
	NFAPI_FUZZ_EXAMPLES=600 NFAPI_FUZZ_SEED=$${SEED:-$$(date +%s)} $(PYTHON) -m pytest -q -s tests/test_hardening.py -k "schemathesis or raw_socket"

# PNGs of the web page's main views into docs/ (needs Playwright and Debian's chromium, as the browser tests do).
.PHONY: screenshots
screenshots:
	$(PYTHON) tests/screenshots.py docs

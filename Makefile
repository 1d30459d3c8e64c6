# nfapi. `make run`: server + one worker (Ctrl-C stops both, the worker first). `make test`: the test
# suite, in a virtual environment it builds itself. The variables are described in README.md.
PYTHON ?= python3
CONFIG ?= example-config.json
DATA ?= nfapi-data
HOST ?= 127.0.0.1
PORT ?= 8000
NEXTFLOW ?= nextflow
SLOTS ?= 1
# One virtual environment per Python version: the CI's run under 3.8 builds its own.
VENV ?= .venv-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: run demo test venv bench soak test-sqlite-3.24

# The recipes below run in one shell each. The server and the worker are its background jobs, which
# ignore SIGINT (a shell starts them so) and SIGHUP (`trap '' HUP` before they start): Ctrl-C and a
# hang-up reach only the recipe's shell, which stops them in order (stop_in_order).
#
# start_server: start the server ($(1): its options, $(2): its data folder) and wait until
# <data>/server.json names that very process. A server that cannot listen (port in use) exits, and
# nothing else starts: the token never goes to whatever program holds the port. Sets $$server, $$url.
SERVER_URL = import json, sys; s = json.load(open(sys.argv[1])); print(s["url"]) if s["pid"] == int(sys.argv[2]) else sys.exit(1)
start_server = trap '' HUP; trap 'stop=1' INT TERM; \
	$(PYTHON) nfapi.py --data $(2) $(1) & server=$$!; \
	until url=$$($(PYTHON) -c '$(SERVER_URL)' $(2)/server.json $$server 2>/dev/null); do \
	  if [ -n "$$stop" ] || ! kill -0 $$server 2>/dev/null; then kill $$server 2>/dev/null; wait $$server; exit 1; fi; \
	  sleep 0.1; \
	done;

# wait_for_stop: until Ctrl-C, TERM or a hang-up, or until the server or the worker ends by itself.
wait_for_stop = trap 'stop=1' INT TERM HUP; \
	while [ -z "$$stop" ] && kill -0 $$server 2>/dev/null && kill -0 $$worker 2>/dev/null; do \
	  sleep 1 & sleeper=$$!; wait $$sleeper; kill $$sleeper 2>/dev/null; \
	done;

# stop_in_order: the worker first, so it cancels its runs and reports them `cancelled` to a server that
# still listens; then the server. A second Ctrl-C kills both at once. The status is the server's.
stop_in_order = trap 'kill -KILL $$worker $$server 2>/dev/null' INT TERM HUP; \
	kill -TERM $$worker 2>/dev/null; wait $$worker; \
	kill -TERM $$server 2>/dev/null; wait $$server

# The worker talks to the server over its Unix socket in the data folder: it needs no token, and no
# other user can stand in for the server there (a TCP port can be taken while the server restarts).
run:
	@$(call start_server,--config $(CONFIG) --host $(HOST) --port $(PORT) --unix-socket $(DATA)/nfapi.sock,$(DATA)) \
	$(PYTHON) nfapi_worker.py --server unix:$(DATA)/nfapi.sock --slots $(SLOTS) --nextflow $(NEXTFLOW) & worker=$$!; \
	$(wait_for_stop) \
	$(stop_in_order)

# A run end to end without Nextflow: server + worker with tests/fake_nextflow.py, driven by examples/walkthrough.sh.
demo:
	@echo "make demo: runs use tests/fake_nextflow.py, a STAND-IN for Nextflow used by the tests (it runs no real pipeline)."
	@rm -rf demo-data; \
	$(call start_server,--config $(CONFIG) --port 0 --quiet,demo-data) \
	echo "make demo: the server listens on $$url (a free port); its data folder is demo-data/"; \
	env -u NFAPI_TOKEN FAKE_NF_TASK_SECONDS=1 FAKE_NF_PUBLISH=1 $(PYTHON) nfapi_worker.py --server $$url \
	  --nextflow tests/fake_nextflow.py --token-file demo-data/api-token & worker=$$!; \
	env -u NFAPI_TOKEN examples/walkthrough.sh $$url demo-data/api-token demo-data/downloads; demo=$$?; \
	$(stop_in_order); exit $$demo

# The suite in $(VENV), (re)built from tests/requirements.txt when it is missing or stale: its stamp
# holds the Python and the requirements it was built from.
test: venv
	$(VENV)/bin/python -m pytest -q tests

VENV_STAMP = $(PYTHON) -c 'import sys; print(sys.executable, sys.version)' && cat tests/requirements.txt
venv:
	@[ "$$($(VENV_STAMP))" = "$$(cat $(VENV)/nfapi-stamp 2>/dev/null)" ] || { \
	  echo "make: building $(VENV)/ from tests/requirements.txt"; rm -rf $(VENV) && \
	  $(PYTHON) -m venv $(VENV) && \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt && \
	  ($(VENV_STAMP)) > $(VENV)/nfapi-stamp; }

# The suite with the server and the worker on SQLite 3.24.0, the oldest nfapi supports (CI runs it).
# They run under Python 3.8 (PYTHON38), whose sqlite3 module loads any libsqlite3; SQLite's source
# comes from the npm package sqlite3@4.0.2, which ships it, and is built once into .sqlite-3.24/.
PYTHON38 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.8*/bin/python))
OLD_SQLITE = .sqlite-3.24
test-sqlite-3.24: venv $(OLD_SQLITE)/python
	NFAPI_TEST_PYTHON=$(CURDIR)/$(OLD_SQLITE)/python $(VENV)/bin/python -m pytest -q tests

$(OLD_SQLITE)/python:
	rm -rf $(OLD_SQLITE) && mkdir $(OLD_SQLITE) && cd $(OLD_SQLITE) && \
	npm pack --silent sqlite3@4.0.2 > /dev/null && tar xzf sqlite3-4.0.2.tgz && \
	tar xzf package/deps/sqlite-autoconf-3240000.tar.gz && \
	gcc -O2 -w -fPIC -shared -DSQLITE_THREADSAFE=1 -Wl,-soname,libsqlite3.so.0 sqlite-autoconf-3240000/sqlite3.c \
	  -lpthread -ldl -lm -o libsqlite3.so.0 && \
	printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$$@"\n' "$$(pwd)" "$(PYTHON38)" > python.new && chmod +x python.new && \
	./python.new -c 'import sqlite3, sys; sys.exit(sqlite3.sqlite_version != "3.24.0")' && mv python.new python

# Benchmarks (not part of `make test`): one markdown table, each figure against a baseline of the same run.
# The weblog's peer (Flask + gunicorn) runs from bench/.venv, which bench/run.py makes from bench/requirements.txt.
bench:
	$(PYTHON) bench/run.py

# A longer fuzzing soak (not part of `make test`): ten times the examples, a seed of your choice.
soak: venv
	NFAPI_FUZZ_EXAMPLES=600 NFAPI_FUZZ_SEED=$${SEED:-$$(date +%s)} $(VENV)/bin/python -m pytest -q -s tests/test_hardening.py -k "schemathesis or raw_socket"

# PNGs of the web page's main views into docs/ (needs Debian's chromium, as the browser tests do).
.PHONY: screenshots
screenshots: venv
	$(VENV)/bin/python tests/screenshots.py docs

"""The seed's stack, as a peer for `make bench`: Flask under gunicorn doing nfapi's SQLite work for
one weblog post. bench/run.py runs it from bench/.venv; it is never a dependency of nfapi.

    NFAPI_PEER_DB=<a database nfapi made> gunicorn -w 2 --threads 8 -k gthread flask_peer:app

The work per post is nfapi's own: its connect() settings (synchronous=NORMAL) and WAL, the run
secret check, and record_weblog (for a task event, record_task's upsert), in one BEGIN IMMEDIATE
transaction. So the comparison measures the stack, not the SQL.
"""

import os
import sys
import threading
import types

from flask import Flask, request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nfapi  # noqa: E402

app = Flask(__name__)
local = threading.local()
SETTINGS = types.SimpleNamespace(config=dict(nfapi.DEFAULTS))  # what nfapi's App gives record_weblog


def connection():
    """One connection per thread, the way a Flask app commonly holds SQLite."""
    if not hasattr(local, "conn"):
        local.conn = nfapi.connect(os.environ["NFAPI_PEER_DB"])
        local.conn.execute("PRAGMA journal_mode = WAL")
    return local.conn


@app.post("/api/workflows/<int:id>/nextflow-log")
def nextflow_log(id):
    run_id, secret, message = request.args.get("run", type=int), request.args.get("token", ""), request.get_json()
    conn = connection()
    conn.execute("BEGIN IMMEDIATE")
    try:
        run = nfapi.weblog_run(conn, id, run_id)
        known = nfapi.weblog_refusal(SETTINGS, run, secret) is None
        if known:
            nfapi.record_weblog(SETTINGS, conn, run, message)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return ("", 200) if known else ("", 401)

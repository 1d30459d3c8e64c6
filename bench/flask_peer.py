"""The seed's stack, as a peer for `make bench`: Flask under gunicorn doing nfapi's SQLite work for
one weblog post. bench/run.py runs it from bench/.venv; it is never a dependency of nfapi.

    NFAPI_PEER_DB=<a database nfapi made> gunicorn -w 2 --threads 8 -k gthread flask_peer:app

The work per post is nfapi's own: its connect() settings (synchronous=NORMAL) and WAL, the run
secret check, and record_weblog (for a task event, record_task's upsert), in one BEGIN IMMEDIATE
transaction. So the comparison measures the stack, not the SQL.
"""

import hmac
import os
import sys
import threading

from flask import Flask, request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nfapi  # noqa: E402

app = Flask(__name__)
local = threading.local()


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
        row = conn.execute("SELECT secret FROM runs WHERE id = ? AND workflow_id = ?", (run_id, id)).fetchone()
        known = row is not None and hmac.compare_digest(secret.encode(), row["secret"].encode())
        if known:
            nfapi.record_weblog(conn, run_id, message)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return ("", 200) if known else ("", 401)

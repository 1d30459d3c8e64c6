"""The weblog receiver: genuine payloads, idempotent counting, per-run secrets; and the stand-in's sequence H."""

import base64
import glob
import json
import os
import subprocess
import threading
import urllib.parse

import pytest

from conftest import FAKE_NEXTFLOW, PYTHON, ROOT, ready_workflow, weblog_target

# Genuine payloads, copied unmodified from ../shared/reference/weblog-samples (provenance in SOURCES.md).
SAMPLE_DIR = os.path.join(ROOT, "tests", "data", "weblog-samples")
SAMPLES = sorted(glob.glob(os.path.join(SAMPLE_DIR, "*.json")))


def claim(api, worker="test-worker"):
    resp = api.post("/api/worker/claim", {"worker": worker, "wait": 0})
    assert resp.status == 200, resp
    return resp.json()["run"]


def scheduled_run(api, name="wl"):
    wid = ready_workflow(api, name=name)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    launch = claim(api)
    return wid, launch, weblog_target(launch)


def post(api, target, body, headers=None):
    target_path = target.path + "?" + target.query
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return api.request("POST", target_path, body=data, headers=dict({"Content-Type": "application/json"}, **(headers or {})),
                       token=False)


def counts(api, wid):
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    return wf["submitted_processes"], wf["completed_processes"], wf["run"]["failed"]


def trace_event(event, task_id, status, exit_code=2147483647):
    return {"trace": {"task_id": task_id, "status": status, "name": "P (%d)" % task_id, "process": "P",
                      "exit": exit_code, "submit": 1, "start": 0, "attempt": 1, "workdir": "/w/%d" % task_id},
            "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1", "event": event, "runName": "x", "utcTime": "2019-10-07T17:46:24Z"}


def test_samples_exist():
    assert len(SAMPLES) >= 7


@pytest.mark.parametrize("path", SAMPLES, ids=os.path.basename)
def test_genuine_samples_are_accepted_unmodified(stand, path):
    api = stand.client()
    _, _, target = scheduled_run(api)
    with open(path, "rb") as f:
        body = f.read()
    resp = post(api, target, body)
    assert resp.status == 200 and resp.body == b"" and resp.headers["Content-Length"] == "0"


def test_samples_are_understood(stand):
    api = stand.client()
    wid, launch, target = scheduled_run(api)
    for name in ("icgcrelay-process_submitted.json", "icgcrelay-completed.json"):
        with open(os.path.join(SAMPLE_DIR, name), "rb") as f:
            assert post(api, target, f.read()).status == 200
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    assert wf["submitted_processes"] == 1 and wf["run"]["cached"] == 0
    started = json.load(open(os.path.join(SAMPLE_DIR, "nfweblog-started.json")))
    post(api, target, started)
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["session_id"] == started["runId"]


def test_duplicates_and_out_of_order_posts_do_not_change_counts(stand):
    api = stand.client()
    wid, _, target = scheduled_run(api)
    events = []
    for task in (1, 2, 3):
        events += [trace_event("process_submitted", task, "SUBMITTED"), trace_event("process_started", task, "RUNNING")]
    events += [trace_event("process_completed", 1, "COMPLETED", 0), trace_event("process_completed", 2, "FAILED", 1),
               trace_event("process_completed", 3, "ABORTED")]
    for event in events:
        assert post(api, target, event).status == 200
    assert counts(api, wid) == (3, 1, 2)
    for event in events + list(reversed(events)):
        assert post(api, target, event).status == 200
    assert counts(api, wid) == (3, 1, 2)
    # A late COMPLETED for a task already FAILED does not flip it.
    post(api, target, trace_event("process_completed", 2, "COMPLETED", 0))
    assert counts(api, wid) == (3, 1, 2)
    # A task whose first post is its completion counts as submitted and completed.
    post(api, target, trace_event("process_completed", 4, "COMPLETED", 0))
    assert counts(api, wid) == (4, 2, 2)
    # A name no database could store (a lone surrogate) is refused and counts nothing.
    assert post(api, target, json.dumps(trace_event("process_completed", 5, "COMPLETED", 0)).replace(
        '"P (5)"', '"P \\ud800"').encode()).status == 400
    assert counts(api, wid) == (4, 2, 2)


def test_secrets_are_per_run(stand):
    api = stand.client()
    wid1, _, target1 = scheduled_run(api, "one")
    wid2, launch2, target2 = scheduled_run(api, "two")
    secret2 = urllib.parse.parse_qs(target2.query)["token"][0]
    run1 = urllib.parse.parse_qs(target1.query)["run"][0]
    forged = target1._replace(query="run=%s&token=%s" % (run1, secret2))
    for target, headers in [(forged, {}), (target1._replace(query="run=%s" % run1), {}),
                            (target1._replace(query="run=%s&token=" % run1), {}),
                            (target1._replace(query="token=" + secret2), {}),
                            (target1._replace(query="run=%s" % run1), {"Authorization": "Bearer " + stand.token}),
                            (target1._replace(query="run=%s" % run1),
                             {"Authorization": "Basic " + base64.b64encode(b"nfapi:" + secret2.encode()).decode()}),
                            (target2._replace(path="/api/workflows/%d/nextflow-log" % wid1), {})]:
        resp = post(api, target, trace_event("process_submitted", 1, "SUBMITTED"), headers)
        assert resp.status == 401, (target, resp)
    assert counts(api, wid1) == (0, 0, 0) and counts(api, wid2) == (0, 0, 0)
    # weblog.basicToken sends `user:secret` as HTTP Basic.
    secret1 = urllib.parse.parse_qs(target1.query)["token"][0]
    basic = {"Authorization": "Basic " + base64.b64encode(("nextflow:" + secret1).encode()).decode()}
    assert post(api, target1._replace(query="run=" + run1), trace_event("process_submitted", 1, "SUBMITTED"), basic).status == 200
    assert counts(api, wid1) == (1, 0, 0)


def test_simultaneous_posts_of_many_runs_are_each_counted_once(stand):
    """Posts that arrive together share a write transaction; a wrong secret among them fails alone."""
    api = stand.client()
    runs = [scheduled_run(api, "together %d" % i) for i in range(6)]
    forged = runs[0][2]._replace(query="run=%s&token=wrong" % urllib.parse.parse_qs(runs[0][2].query)["run"][0])
    statuses = {}

    def send(key, target):
        client = stand.client()
        for task in range(1, 151):
            resp = post(client, target, trace_event("process_completed", task, "COMPLETED" if task % 5 else "FAILED", 0))
            statuses.setdefault(key, set()).add(resp.status)
    threads = [threading.Thread(target=send, args=(wid, target)) for wid, _, target in runs]
    threads += [threading.Thread(target=send, args=("forged %d" % i, forged)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(statuses[key] == {200} for key, _, _ in runs) and statuses["forged 0"] == statuses["forged 1"] == {401}
    for wid, _, target in runs:
        assert counts(api, wid) == (150, 120, 30)
    assert api.get("/api/workflows/%d/runs/%s/tasks?status=FAILED" % (
        runs[0][0], urllib.parse.parse_qs(runs[0][2].query)["run"][0])).json()["tasks"][0]["task_id"] == 5


def test_whoever_got_an_answer_reads_what_the_post_said(stand):
    """A request that starts after a post's answer, on another connection, sees the post, every time:
    a post is answered only once it is written."""
    api, reader = stand.client(), stand.client()
    wid, _, target = scheduled_run(api)
    run_id = urllib.parse.parse_qs(target.query)["run"][0]
    for task in range(1, 301):
        status = "FAILED" if task % 3 == 0 else "COMPLETED"
        assert post(api, target, trace_event("process_completed", task, status, 1 if status == "FAILED" else 0)).status == 200
        if task % 2:
            assert counts(reader, wid) == (task, task - task // 3, task // 3), task
        else:
            tasks = reader.get("/api/workflows/%d/runs/%s/tasks?offset=%d" % (wid, run_id, task - 1)).json()["tasks"]
            assert [(t["task_id"], t["status"]) for t in tasks] == [(task, status)], task


def test_envelopes_of_every_era_and_junk(stand):
    api = stand.client()
    wid, _, target = scheduled_run(api)
    old = trace_event("process_submitted", 7, "SUBMITTED")
    del old["event"]
    old["runStatus"] = "process_submitted"  # 18.10: runStatus, no event
    assert post(api, target, old).status == 200
    for body in ({}, {"event": "started"}, {"event": "completed", "metadata": "not an object"},
                 {"trace": {"task_id": "x", "status": "SUBMITTED"}}, {"trace": {"task_id": 1, "status": "WEIRD"}},
                 {"trace": {"task_id": True, "status": "SUBMITTED"}}, {"trace": [1, 2]},
                 {"event": "completed", "metadata": {"workflow": {"start": {"year": 2024}, "success": "yes"}}}):
        assert post(api, target, body).status == 200, body
    assert counts(api, wid) == (1, 0, 0)
    for body, status in ((b"[1,2]", 422), (b'"text"', 422), (b"{", 400), (b"", 200)):
        assert post(api, target, body).status == status, body
    assert counts(api, wid) == (1, 0, 0)


def test_stand_in_sequence_h_receiver_down(tmp_path):
    """H: with nothing listening the run is unaffected; one WARN per distinct message."""
    script = tmp_path / "main.nf"
    script.write_text("process A {\n}\nprocess B {\n}\n")
    params = tmp_path / "params.json"
    params.write_text("{}")
    proc = subprocess.run([PYTHON, FAKE_NEXTFLOW, "run", str(script), "-params-file", str(params), "-with-weblog",
                           "http://127.0.0.1:9/nope", "-name", "h-run", "-ansi-log", "false"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, FAKE_NF_TASK_SECONDS="0"))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("WARN: java.net.ConnectException: Connection refused") == 1
    history = (tmp_path / ".nextflow" / "history").read_text().split("\t")
    assert history[2] == "h-run" and history[3] == "OK"


def test_stand_in_refuses_a_bad_weblog_url_before_any_event(tmp_path):
    script = tmp_path / "main.nf"
    script.write_text("process A {\n}\n")
    proc = subprocess.run([PYTHON, FAKE_NEXTFLOW, "run", str(script), "-with-weblog", "localhost:8080"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "ERROR ~ Only http and https are supported -- The given URL was: localhost:8080" in proc.stdout

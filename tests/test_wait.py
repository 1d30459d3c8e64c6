"""`?wait=<seconds>` on a run and on a workflow: answer when the run ends, blocking on the server's
notifications instead of polling (issue 13, "Wait instead of poll")."""

import http.client
import json
import os
import subprocess
import threading
import time

from conftest import FINAL_STATES, ready_workflow, schedule, wait_final

SLOW_TASKS = {"FAKE_NF_TASK_SECONDS": "1"}


def get_json(port, token, path, timeout=90):
    """One GET on its own connection: (seconds it took, status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request("GET", path, headers={"Authorization": "Bearer " + token})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        return time.monotonic() - started, resp.status, body
    finally:
        conn.close()


def in_thread(function, *args):
    """Start function(*args) in a thread; join() the returned thread, then read `.result`."""
    thread = threading.Thread(target=lambda: setattr(thread, "result", function(*args)))
    thread.start()
    return thread


def test_wait_answers_within_a_second_of_the_runs_end(stand):
    stand.worker(env=SLOW_TASKS)
    api = stand.client()
    wid = ready_workflow(api)
    run_id = schedule(api, wid)
    waiters = [in_thread(get_json, stand.port, stand.token, "/api/workflows/%d?wait=30" % wid),
               in_thread(get_json, stand.port, stand.token, "/api/workflows/%d/runs/%d?wait=30" % (wid, run_id))]
    for waiter in waiters:
        waiter.join()
    answered = time.time()
    (waited_wf, status_wf, workflow), (waited_run, status_run, run) = [w.result for w in waiters]
    assert status_wf == status_run == 200
    assert workflow["workflow"]["status"] == run["run"]["status"] == "succeeded"
    assert run["run"]["id"] == run_id and workflow["workflow"]["run"]["id"] == run_id
    # The run took two one-second tasks: the answers came at its end, not at once, and not long after.
    assert waited_wf > 1.5 and waited_run > 1.5
    latency = answered - run["run"]["finished_at"]
    print("answered %.3f s after the run's end" % latency)
    assert latency < 1.0


def test_wait_answers_at_the_timeout_with_the_current_state(stand):
    api = stand.client()  # no worker: the run stays queued
    wid = ready_workflow(api)
    run_id = schedule(api, wid)
    waited, status, body = get_json(stand.port, stand.token, "/api/workflows/%d/runs/%d?wait=2" % (wid, run_id))
    assert status == 200 and body["run"]["status"] == "queued"
    assert 2 <= waited < 3.5
    waited, status, body = get_json(stand.port, stand.token, "/api/workflows/%d?wait=1" % wid)
    assert status == 200 and body["workflow"]["status"] == "queued" and 1 <= waited < 2.5
    # Without `wait`, or with wait=0, the answer comes at once.
    for path in ("/api/workflows/%d" % wid, "/api/workflows/%d?wait=0" % wid, "/api/workflows/%d/runs/%d" % (wid, run_id)):
        waited, status, _ = get_json(stand.port, stand.token, path)
        assert status == 200 and waited < 0.5, path
    # A run that already ended answers at once, however long the wait.
    assert api.post("/api/workflows/%d/cancel" % wid).status == 200
    waited, status, body = get_json(stand.port, stand.token, "/api/workflows/%d/runs/%d?wait=60" % (wid, run_id))
    assert status == 200 and body["run"]["status"] == "cancelled" and waited < 0.5


def test_wait_wakes_on_cancel_and_without_a_run_answers_at_once(stand):
    api = stand.client()
    wid = ready_workflow(api)
    waited, _, body = get_json(stand.port, stand.token, "/api/workflows/%d?wait=30" % wid)
    assert body["workflow"]["run"] is None and waited < 0.5
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    waiter = in_thread(get_json, stand.port, stand.token, "/api/workflows/%d?wait=30" % wid)
    # Whether the cancel comes before the waiter waits or after, it answers at once (a waiter already
    # waiting when its run ends: test_wait_answers_within_a_second_of_the_runs_end).
    assert api.post("/api/workflows/%d/cancel" % wid).status == 200
    cancelled = time.monotonic()
    waiter.join()
    assert waiter.result[2]["workflow"]["status"] == "cancelled"
    assert waiter.result[0] < 2 and time.monotonic() - cancelled < 1


def test_wait_out_of_range_is_422(api):
    wid = ready_workflow(api)
    for value in ("61", "-1", "1.5", "abc", "", "99999999999999999999"):
        for path in ("/api/workflows/%d?wait=%s" % (wid, value), "/api/workflows/%d/runs/1?wait=%s" % (wid, value)):
            resp = api.get(path)
            assert resp.status == 422, (path, resp)
            assert "wait" in resp.json()["errors"]


def test_100_waiting_clients_block_and_burn_no_cpu(stand):
    api = stand.client()  # no worker: nothing changes while they wait
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    before = stand.cpu_seconds()
    started = time.monotonic()
    waiters = [in_thread(get_json, stand.port, stand.token, "/api/workflows/%d?wait=3" % wid) for _ in range(100)]
    for waiter in waiters:
        waiter.join()
    elapsed = time.monotonic() - started
    used = stand.cpu_seconds() - before
    print("100 clients waiting %.1f s cost the server %.3f s of CPU" % (elapsed, used))
    assert all(w.result[1] == 200 and w.result[2]["workflow"]["status"] == "queued" for w in waiters)
    assert all(w.result[0] >= 3 for w in waiters)
    assert used < 0.5


def test_a_curl_loop_ends_within_a_second_of_the_runs_end(stand):
    stand.worker(env=SLOW_TASKS)
    api = stand.client()
    wid = ready_workflow(api)
    run_id = schedule(api, wid)
    # The loop a user would write: ask with a short wait until the run is no longer queued or running.
    script = """
        until curl -s -H "Authorization: Bearer $TOKEN" "$URL?wait=1" | grep -qE '"status": "(%s)"'; do :; done
    """ % "|".join(FINAL_STATES)
    url = "%s/api/workflows/%d/runs/%d" % (stand.url, wid, run_id)
    subprocess.run(["bash", "-c", script], env=dict(os.environ, TOKEN=stand.token, URL=url), timeout=60, check=True)
    ended = time.time()
    run = wait_final(api, wid)["run"]
    assert run["status"] == "succeeded"
    latency = ended - run["finished_at"]
    print("the curl loop ended %.3f s after the run's end" % latency)
    assert latency < 1.0

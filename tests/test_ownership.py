"""Issue 11, findings 7 and 8: who owns a run, one nextflow per launch folder, and what a run leaves behind."""

import os
import signal
import stat

import pytest

from conftest import ready_workflow, wait_final, wait_for


def start_long_run(api):
    """A ready workflow scheduled, once its first task was submitted: (workflow id, run)."""
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["submitted_processes"] == 1,
             message="the first task to be submitted")
    return wid, api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]


def run_json(api, wid, run_id):
    return api.get("/api/workflows/%d/runs/%d" % (wid, run_id)).json()["run"]


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def polling(worker, port):
    """Whether the worker has a connection open to the server (its claim long-poll, when it runs nothing)."""
    pid = worker.proc.pid
    sockets = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            sockets.add(link[8:-1])
    for table in ("tcp", "tcp6"):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in sockets:
                    return True
    return False


def test_a_token_holder_without_the_claim_secret_cannot_end_or_requeue_a_run(stand):
    stand.worker(env={"FAKE_NF_TASK_SECONDS": "60"})
    api = stand.client()
    wid, run = start_long_run(api)
    for secret in ({}, {"claim_secret": "wrong"}, {"claim_secret": None}):
        resp = api.post("/api/workflows/%d/finished" % wid, dict({"run_id": run["id"], "exit_code": 0,
                                                                   "worker": run["worker"]}, **secret))
        assert resp.status == 403, resp
        resp = api.post("/api/worker/release", dict({"run_id": run["id"]}, **secret))
        assert resp.status == 403, resp
    resp = api.post("/api/worker/heartbeat", {"worker": run["worker"], "runs": [{"run_id": run["id"], "claim_secret": "x"}]})
    assert resp.json() == {"cancel": [], "gone": [run["id"]]}
    assert run_json(api, wid, run["id"])["status"] == "running"
    assert api.post("/api/workflows/%d/cancel" % wid).status == 200
    assert wait_final(api, wid)["status"] == "cancelled"


def test_a_paused_worker_loses_its_run_for_good_and_no_second_nextflow_starts_beside_the_first(stand):
    first = stand.worker(env={"FAKE_NF_TASK_SECONDS": "60"}, args=["--grace", "1"])
    api = stand.client()
    wid, run = start_long_run(api)
    nextflow = first.records()["nfapi-run-%d" % run["id"]]["pid"]
    first.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: run_json(api, wid, run["id"])["status"] == "lost", timeout=15, message="the run to be lost")
        second = stand.worker()
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        wf = wait_final(api, wid)
        assert wf["status"] == "failed" and "another nextflow" in wf["run"]["error_message"], wf["run"]
        assert alive(nextflow) and "nfapi-run-%d" % wf["run"]["id"] not in second.records()
    finally:
        first.proc.send_signal(signal.SIGCONT)
    # Back, the first worker learns its run is gone and stops that nextflow; its report is kept aside.
    wait_for(lambda: not alive(nextflow), timeout=15, message="the first nextflow to be stopped")
    late = wait_for(lambda: run_json(api, wid, run["id"])["late_report"], message="the late report")
    assert late["exit_code"] == 1 and run_json(api, wid, run["id"])["status"] == "lost"
    first.stop()
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    assert wait_final(api, wid)["status"] == "succeeded"


def test_a_worker_stopped_while_its_claim_poll_is_open_is_not_handed_a_run(stand):
    first = stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    wait_for(lambda: polling(first, stand.port), message="the worker's claim poll")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "queued"
    second = stand.worker()
    wf = wait_final(api, wid)
    assert wf["status"] == "succeeded" and "nfapi-run-%d" % wf["run"]["id"] in second.records()


@pytest.mark.stand(claim_confirm_seconds=1)
def test_a_claim_the_worker_never_confirms_goes_back_to_the_queue(stand):
    first = stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    wait_for(lambda: polling(first, stand.port), message="the worker's claim poll")
    first.proc.send_signal(signal.SIGSTOP)  # its poll stays open: the server cannot tell
    try:
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["worker"], message="the claim")
        wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "queued",
                 message="the unconfirmed claim to be withdrawn")
        second = stand.worker()
        wf = wait_final(api, wid)
        assert wf["status"] == "succeeded" and "nfapi-run-%d" % wf["run"]["id"] in second.records()
    finally:
        first.proc.send_signal(signal.SIGCONT)
    # The stale answer reaches the first worker now: it asks, learns the run is not its own, starts nothing.
    wait_for(lambda: "not ours any more" in first.output(), message="the first worker to drop the stale claim")
    assert first.records() == {}


def test_files_nextflow_creates_are_private(stand):
    stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    assert wait_final(api, wid)["status"] == "succeeded"
    launch = os.path.join(stand.data, "launch", str(wid))
    seen = []
    for parent, folders, files in os.walk(launch):
        for name in folders + files:
            seen.append((os.path.relpath(os.path.join(parent, name), launch),
                         stat.S_IMODE(os.lstat(os.path.join(parent, name)).st_mode)))
    assert {".nextflow", ".nextflow/history", ".nextflow.log", "work"} <= {path for path, _ in seen}
    assert [(path, oct(mode)) for path, mode in seen if mode & 0o077] == []


def test_deleting_a_workflow_removes_its_run_folders(stand):
    stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    runs = []
    for _ in range(2):
        api.post("/api/workflows/%d/schedule" % wid)
        runs.append(wait_final(api, wid)["run"]["id"])
    for run_id in runs:
        assert os.path.exists(os.path.join(stand.data, "runs", str(run_id), "console.log"))
    assert api.post("/api/workflows/%d/delete" % wid).status == 200
    assert not [r for r in runs if os.path.exists(os.path.join(stand.data, "runs", str(r)))]
    # A folder left by a server killed while deleting goes at the next start.
    os.makedirs(os.path.join(stand.data, "runs", "999", "x"))
    stand.stop()
    stand.start()
    assert os.listdir(os.path.join(stand.data, "runs")) == []

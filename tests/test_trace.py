"""Issue 12, after a server restart runs must end honest: Nextflow never retries a weblog post, so posts
sent while the server was down (or lost on the way) are gone. When a run ends, the server brings its
tasks to what Nextflow's own trace file (<run dir>/trace.txt) says, never moving a task backwards."""

import json
import os
import signal
import threading

import pytest

from conftest import (ServerProcess, WorkerProcess, processes_with_marker, ready_workflow, wait_final, wait_for,
                      weblog_target, write_config)


def tasks_of(api, wid, run_id):
    return api.get("/api/workflows/%d/runs/%d/tasks" % (wid, run_id)).json()["tasks"]


def counts(wf):
    return wf["submitted_processes"], wf["completed_processes"], wf["run"]["failed"]


@pytest.mark.parametrize("knobs, end, statuses", [
    # The first task is never heard of, and no task's completion arrives.
    ({"FAKE_NF_DROP_POSTS": "process_submitted:1,process_started:1,process_completed:9"}, ("succeeded", (4, 4, 0)),
     ["COMPLETED"] * 4),
    # Sequence B with every completion lost: the failed task and the two killed ones.
    ({"FAKE_NF_DROP_POSTS": "process_completed:9", "FAKE_NF_FAIL": "COUNT_LINES", "FAKE_NF_TASK_SECONDS": "3",
      "FAKE_NF_TASKS": "3"}, ("failed", (3, 0, 3)), ["FAILED", "ABORTED", "ABORTED"]),
], ids=["success", "task-failure"])
def test_posts_lost_on_the_way_are_made_good_from_the_trace_file(stand, knobs, end, statuses):
    stand.worker(env=dict({"FAKE_NF_TASKS": "2"}, **knobs))
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    wf = wait_final(api, wid)
    assert (wf["status"], counts(wf)) == end
    tasks = tasks_of(api, wid, wf["run"]["id"])
    assert sorted(t["status"] for t in tasks) == sorted(statuses)
    for task in tasks:
        assert task["process"] and task["name"] and task["workdir"] and task["submit"] and task["complete"], task
        assert task["exit"] == {"COMPLETED": 0, "FAILED": 1, "ABORTED": None}[task["status"]], task


def test_a_server_killed_mid_run_still_ends_it_with_every_task_final(tmp_path):
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=5)).start()
    worker = WorkerProcess(srv, tmp_path, env={"FAKE_NF_TASK_SECONDS": "1.5", "FAKE_NF_TASKS": "2"}).start()
    try:
        api = srv.client()
        wid = ready_workflow(api)
        api.post("/api/workflows/%d/schedule" % wid)
        run_id = wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["run"], message="run")["id"]
        wait_for(lambda: [t["status"] for t in tasks_of(api, wid, run_id)] == ["RUNNING", "RUNNING"], timeout=20,
                 message="the first two tasks to run")
        srv.stop(signal.SIGKILL)
        console = os.path.join(srv.data, "runs", str(run_id), "console.log")

        def second_stage():
            with open(console) as f:
                return "Submitted process > SUMMARY" in f.read()
        # The first tasks end while no server listens: their posts are lost for good.
        wait_for(second_stage, timeout=20, message="the first stage to end")
        srv.args = ["--port", str(srv.port)]
        srv.start()
        api = srv.client()
        wf = wait_final(api, wid, timeout=40)
        assert (wf["status"], counts(wf)) == ("succeeded", (4, 4, 0))
        assert [(t["task_id"], t["status"], t["exit"]) for t in tasks_of(api, wid, run_id)] == [
            (1, "COMPLETED", 0), (2, "COMPLETED", 0), (3, "COMPLETED", 0), (4, "COMPLETED", 0)]
    finally:
        worker.stop()
        wait_for(lambda: not processes_with_marker(worker.marker), timeout=15, message="worker's processes to exit")
        srv.stop()
    assert "Traceback" not in srv.output()


# ==== What the server makes of a trace file ====

def claimed(api, name):
    wid = ready_workflow(api, name=name)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    launch = api.post("/api/worker/claim", {"worker": "trace-test", "wait": 0}).json()["run"]
    os.makedirs(launch["run_dir"], exist_ok=True)
    return wid, launch


def post(api, launch, trace):
    target = weblog_target(launch)
    body = {"trace": trace, "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1", "event": "process_completed",
            "runName": "x"}
    assert api.request("POST", target.path + "?" + target.query, body=body, token=False).status == 200


def finished(api, wid, launch, exit_code=1):
    resp = api.post("/api/workflows/%d/finished" % wid, {
        "run_id": launch["run_id"], "claim_secret": launch["claim_secret"], "exit_code": exit_code})
    assert resp.status == 200, resp
    return api.get("/api/workflows/%d" % wid).json()["workflow"]


# Columns in an order of their own: the server reads them by the header's names.
HEADER = "status\ttask_id\texit\tname\tprocess\ttag\tsubmit\tstart\tcomplete\t%cpu\tpeak_rss\tworkdir\n"


def test_the_trace_file_never_moves_a_task_back_and_skips_what_it_cannot_trust(stand):
    api = stand.client()
    wid, launch = claimed(api, "trace")
    post(api, launch, {"task_id": 1, "status": "COMPLETED", "exit": 0, "name": "P (1)", "process": "P",
                       "submit": 1000, "start": 2000, "complete": 3000, "workdir": "/w/1"})
    post(api, launch, {"task_id": 2, "status": "SUBMITTED", "exit": 2147483647, "name": "P (2)", "process": "P",
                       "submit": 1000, "start": 0, "workdir": "/w/2"})
    with open(os.path.join(launch["run_dir"], "trace.txt"), "w") as f:
        f.write(HEADER)
        f.write("RUNNING\t1\t-\tP (1)\tP\t-\t1000\t2000\t-\t-\t-\t/w/1\n")  # behind what the weblog said
        f.write("COMPLETED\t2\t0\tP (2)\tP\t-\t1000\t2500\t4000\t97.5\t1048576\t/w/2\n")
        f.write("FAILED\t3\t1\tQ (1)\tQ\t-\t1000\t2500\t4000\t-\t-\t/w/3\n")
        f.write("COMPLETED\t4\t0\tQ (2)\tQ\ta\ttag with a tab\t1000\t2500\t4000\t-\t-\t/w/4\n")  # shifted columns
        f.write("COMPLETED\tfour\t0\tQ (2)\tQ\t-\t1000\t2500\t4000\t-\t-\t/w/4\n")
        f.write("COMPLETED\t5\t0\tQ (3)\tQ\t-\t1000\t2500\t4000\t-\t-\t/w/5")  # a line nextflow had not ended
    wf = finished(api, wid, launch)
    assert wf["status"] == "failed" and counts(wf) == (3, 2, 1)
    tasks = tasks_of(api, wid, launch["run_id"])
    assert [(t["task_id"], t["status"], t["exit"], t["start"], t["complete"]) for t in tasks] == [
        (1, "COMPLETED", 0, 2000, 3000), (2, "COMPLETED", 0, 2500, 4000), (3, "FAILED", 1, 2500, 4000)]
    assert tasks[2]["process"] == "Q" and tasks[2]["name"] == "Q (1)" and tasks[2]["workdir"] == "/w/3"


def test_a_trace_file_that_is_a_link_or_a_fifo_is_not_read(stand, tmp_path):
    api = stand.client()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(HEADER + "COMPLETED\t1\t0\tP (1)\tP\t-\t1000\t2000\t3000\t-\t-\t/w/1\n")
    for kind in ("link", "fifo"):
        wid, launch = claimed(api, kind)
        path = os.path.join(launch["run_dir"], "trace.txt")
        if kind == "link":
            os.symlink(str(elsewhere), path)
        else:
            os.mkfifo(path)
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(wf=finished(stand.client(), wid, launch, 0)))
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the server waits for a writer of the FIFO"
        assert answer["wf"]["status"] == "succeeded" and counts(answer["wf"]) == (0, 0, 0), kind


def test_a_repeated_end_report_reads_the_trace_once(stand):
    """The worker repeats its report when the answer is lost: the run has ended, nothing changes."""
    api = stand.client()
    wid, launch = claimed(api, "again")
    with open(os.path.join(launch["run_dir"], "trace.txt"), "w") as f:
        f.write(HEADER + "COMPLETED\t1\t0\tP (1)\tP\t-\t1000\t2000\t3000\t-\t-\t/w/1\n")
    assert counts(finished(api, wid, launch, 0)) == (1, 1, 0)
    with open(os.path.join(launch["run_dir"], "trace.txt"), "a") as f:
        f.write("COMPLETED\t2\t0\tP (2)\tP\t-\t1000\t2000\t3000\t-\t-\t/w/2\n")
    assert counts(finished(api, wid, launch, 0)) == (1, 1, 0)
    assert json.dumps(tasks_of(api, wid, launch["run_id"])).count('"task_id"') == 1

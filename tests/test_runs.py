"""The run lifecycle end to end: real server, real worker, the nextflow stand-in (tests/fake_nextflow.py)."""

import json
import os
import signal
import stat

from conftest import ROOT, processes_with_marker, ready_workflow, wait_final, wait_for

SCRIPT = os.path.join(ROOT, "examples", "demo", "main.nf")


def start_long_run(api):
    """A ready workflow scheduled, once its first task was submitted (the worker's tasks run long)."""
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["submitted_processes"] == 1,
             interval=0.01, message="the first task to be submitted")
    return wid


def run_to_end(api, **workflow):
    """A ready workflow scheduled and followed to its final state: (workflow id, workflow)."""
    wid = ready_workflow(api, **workflow)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    return wid, wait_final(api, wid)


def test_success_sequence_a(stand):
    worker = stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).json()["is_scheduled"] is True
    wf = wait_final(api, wid)
    run = wf["run"]
    assert wf["status"] == "succeeded" and wf["is_scheduled"] is False
    assert run["exit_code"] == 0 and run["error_message"] is None
    assert (wf["submitted_processes"], wf["completed_processes"], run["failed"]) == (2, 2, 0)
    assert run["nextflow_run_name"] == "nfapi-run-%d" % run["id"] and len(run["session_id"]) == 36
    assert run["created_at"] <= run["started_at"] <= run["finished_at"]
    run_dir = os.path.join(stand.data, "runs", str(run["id"]))
    for name in ("params.json", "console.log"):
        assert stat.S_IMODE(os.stat(os.path.join(run_dir, name)).st_mode) == 0o600
    with open(os.path.join(run_dir, "console.log")) as f:
        console = f.read()
    assert "Submitted process > COUNT_LINES (1)" in console and "Submitted process > SUMMARY (1)" in console
    launch = os.path.join(stand.data, "launch", str(wid))
    assert os.path.exists(os.path.join(launch, ".nextflow.log")) and os.path.exists(os.path.join(launch, ".nextflow", "history"))
    # The launch folder is outside the file tree: the listing shows only the user's files.
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["reads"], "files": ["ref.fa"]}
    record = worker.records()[run["nextflow_run_name"]]
    assert "NFAPI_TOKEN" not in record["environ"] and stand.token not in json.dumps(record["environ"])


def test_exact_argv_and_params_for_every_argument_type(stand):
    worker = stand.worker()
    api = stand.client()
    root = os.path.realpath(os.path.join(stand.data, "workflows"))
    for title in ("-resume", 'spaces and "quotes" and \'single\' $(rm -rf /)'):
        wid = ready_workflow(api, title=title)
        api.post("/api/workflows/%d/schedule" % wid)
        run = wait_final(api, wid)["run"]
        assert run["status"] == "succeeded", run
        record = worker.records()["nfapi-run-%d" % run["id"]]
        run_dir = os.path.join(stand.data, "runs", str(run["id"]))
        launch = os.path.join(stand.data, "launch", str(wid))
        argv = record["argv"]
        assert argv == ["run", SCRIPT, "-params-file", os.path.join(run_dir, "params.json"),
                        "-name", "nfapi-run-%d" % run["id"], "-work-dir", os.path.join(launch, "work"), "-ansi-log", "false",
                        "-c", os.path.join(run_dir, "nfapi.config")]
        assert record["cwd"] == launch
        folder = os.path.join(root, str(wid))
        assert json.loads(record["params_file"]) == {
            "reference": os.path.join(folder, "ref.fa"),
            "extra_files": os.path.join(folder, "ref.fa") + "," + os.path.join(folder, "reads", "s0.fastq"),
            "reads": os.path.join(folder, "reads", "*.fastq"),
            "min_length": 12,
            "title": title,
            "outdir": os.path.join(folder, "results"),
        }
        assert title not in argv


def test_task_failure_sequence_b(stand):
    stand.worker(env={"FAKE_NF_FAIL": "COUNT_LINES", "FAKE_NF_TASKS": "3", "FAKE_NF_TASK_SECONDS": "3"})
    api = stand.client()
    wid, wf = run_to_end(api)
    run = wf["run"]
    assert wf["status"] == "failed" and run["exit_code"] == 1
    assert "Process `COUNT_LINES (1)` terminated with an error exit status (1)" in run["error_message"]
    # One task FAILED; the two still running were killed and reported ABORTED; SUMMARY never ran.
    assert (wf["submitted_processes"], wf["completed_processes"], run["failed"]) == (3, 0, 3)


def test_finish_strategy_sequence_c(stand):
    stand.worker(env={"FAKE_NF_FAIL": "COUNT_LINES", "FAKE_NF_ERROR_STRATEGY": "finish", "FAKE_NF_TASKS": "3",
                      "FAKE_NF_TASK_SECONDS": "0.5"})
    api = stand.client()
    wid, wf = run_to_end(api)
    assert wf["status"] == "failed" and wf["run"]["exit_code"] == 1
    assert "terminated with an error exit status (1)" in wf["run"]["error_message"]
    # The running tasks finished normally; no new stage started.
    assert (wf["submitted_processes"], wf["completed_processes"], wf["run"]["failed"]) == (3, 2, 1)


def test_error_before_any_task_sequence_d(stand):
    stand.worker(env={"FAKE_NF_SCRIPT_ERROR": "Validation of pipeline parameters failed!"})
    api = stand.client()
    wid, wf = run_to_end(api)
    run = wf["run"]
    assert wf["status"] == "failed" and run["exit_code"] == 1
    # No `completed` event carried an errorMessage: the console tail tells what happened.
    assert "ERROR ~ Validation of pipeline parameters failed!" in run["error_message"]
    assert wf["submitted_processes"] == 0 and run["session_id"]


def test_resume_sequence_f(stand):
    worker = stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    resp = api.post("/api/workflows/%d/schedule" % wid, {"resume": True})
    assert resp.status == 422 and resp.json()["errors"]["resume"]
    api.post("/api/workflows/%d/schedule" % wid)
    first = wait_final(api, wid)["run"]
    assert first["status"] == "succeeded"
    assert api.post("/api/workflows/%d/schedule" % wid, {"resume": True}).status == 200
    wf = wait_final(api, wid)
    second = wf["run"]
    assert second["id"] != first["id"] and second["status"] == "succeeded" and second["resume"] is True
    assert second["session_id"] == first["session_id"]
    # The weblog never reports cached tasks; the trace file does, and a cached task counts as done,
    # as Nextflow's console counts it: a resumed run ends at "2 of 2".
    assert second["cached"] == 2 and wf["submitted_processes"] == 2 and wf["completed_processes"] == 2
    statuses = [t["status"] for t in api.get("/api/workflows/%d/runs/%d/tasks" % (wid, second["id"])).json()["tasks"]]
    assert statuses == ["CACHED", "CACHED"]
    argv = worker.records()["nfapi-run-%d" % second["id"]]["argv"]
    assert argv[-2:] == ["-resume", first["session_id"]]


def test_cancel_running_run_sequence_g(stand):
    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "60"})
    api = stand.client()
    wid = start_long_run(api)
    resp = api.post("/api/workflows/%d/cancel" % wid)
    assert resp.status == 200 and resp.json()["workflow"]["status"] == "running"
    wf = wait_final(api, wid, timeout=15)
    assert wf["status"] == "cancelled" and wf["run"]["exit_code"] == 1
    assert wf["run"]["error_message"] == "SIGTERM"
    assert wf["run"]["failed"] == 1  # the killed task came back ABORTED
    wait_for(lambda: processes_with_marker(worker.marker) == [worker.proc.pid], timeout=10,
             message="nextflow and its tasks to be gone")
    assert api.post("/api/workflows/%d/cancel" % wid).status == 409


def test_cancel_queued_run(stand):
    api = stand.client()
    wid = ready_workflow(api)
    api.post("/api/workflows/%d/schedule" % wid)
    resp = api.post("/api/workflows/%d/cancel" % wid)
    assert resp.status == 200
    wf = resp.json()["workflow"]
    assert wf["status"] == "cancelled" and wf["is_scheduled"] is False and wf["run"]["started_at"] is None
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200


def test_missing_nextflow_binary_fails_the_run(stand, tmp_path):
    stand.worker(nextflow=str(tmp_path / "no-such-nextflow"))
    api = stand.client()
    wid, wf = run_to_end(api)
    assert wf["status"] == "failed" and wf["run"]["exit_code"] is None
    assert "cannot start nextflow" in wf["run"]["error_message"] and "no-such-nextflow" in wf["run"]["error_message"]


def test_worker_sigterm_stops_and_reports_its_runs(stand):
    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "60"})
    api = stand.client()
    wid = start_long_run(api)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    assert wf["status"] == "cancelled" and wf["run"]["error_message"] == "SIGTERM"
    assert processes_with_marker(worker.marker) == []


def test_worker_sigkill_leaves_nothing_running_and_the_run_is_lost(stand):
    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "60"})
    api = stand.client()
    wid = start_long_run(api)
    # The stand-in reports a task submitted a moment before it starts it: worker, nextflow, a task.
    wait_for(lambda: len(processes_with_marker(worker.marker)) >= 3, message="the first task to start")
    worker.proc.kill()
    worker.proc.wait()
    wait_for(lambda: processes_with_marker(worker.marker) == [], timeout=15, message="nextflow and tasks to die")
    wf = wait_final(api, wid, timeout=15)
    assert wf["status"] == "lost" and "heartbeats" in wf["run"]["error_message"]
    assert wf["is_scheduled"] is False


def test_server_sigkill_and_restart_mid_run(stand):
    stand.worker(env={"FAKE_NF_TASK_SECONDS": "2"})
    api = stand.client()
    wid = start_long_run(api)
    stand.stop(signal.SIGKILL)
    stand.args = ["--port", str(stand.port)]
    port = stand.port
    stand.start()
    assert stand.port == port
    wf = wait_final(stand.client(), wid, timeout=30)
    assert wf["status"] == "succeeded" and wf["run"]["exit_code"] == 0
    assert (wf["submitted_processes"], wf["completed_processes"]) == (2, 2)


def test_two_workers_ten_runs_each_exactly_once(stand):
    workers = [stand.worker(args=["--slots", "2"], env={"FAKE_NF_TASK_SECONDS": "0.2"}) for _ in range(2)]
    api = stand.client()
    wids = [ready_workflow(api, name="w%d" % i, reads=1) for i in range(10)]
    for wid in wids:
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    runs = [wait_final(api, wid, timeout=60)["run"] for wid in wids]
    assert all(r["status"] == "succeeded" for r in runs), runs
    launched = [name for w in workers for name in w.records()]
    assert sorted(launched) == sorted("nfapi-run-%d" % r["id"] for r in runs)
    assert all(w.records() for w in workers), "both workers took runs"


def test_worker_waits_for_the_server_and_survives_a_wrong_token(tmp_path):
    from conftest import ServerProcess, WorkerProcess, write_config
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2), env={"NFAPI_TOKEN": "right"},
                        args=["--port", str(port)])
    srv.port = port
    good = WorkerProcess(srv, tmp_path, name="early").start()  # the server is not there yet
    bad = WorkerProcess(srv, tmp_path, name="wrong", env={"NFAPI_TOKEN": "wrong"}).start()
    try:
        wait_for(lambda: "retrying" in good.output() and "answered 401" not in good.output(), message="the worker to retry")
        srv.start()
        api = srv.client()
        wid = ready_workflow(api)
        api.post("/api/workflows/%d/schedule" % wid)
        assert wait_final(api, wid)["status"] == "succeeded"
        wait_for(lambda: bad.output().count("answered 401") >= 2, message="the misconfigured worker to keep trying")
        assert bad.proc.poll() is None and "Traceback" not in bad.output() + good.output()
    finally:
        for w in (good, bad):
            w.stop()
        srv.stop()

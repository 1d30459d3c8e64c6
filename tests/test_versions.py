"""Pinned Nextflow versions (NXF_VER, never argv), what ran (version and commit from `started`), and
relaunching a past run exactly as it was."""

import base64
import json
import os
import sqlite3

import pytest

from conftest import ServerProcess, WorkerProcess, claim_and_confirm, report_finished, schedule, wait_final, wait_for

SESSION = "a46afc37-6d46-4bec-885d-01b13dabc8c1"
COMMIT = "4cdaa36bbf0e8e8d1d5c1d5f3f1c1e5f9a0b1c2d"


def write_config(tmp_path, **pipelines):
    (tmp_path / "main.nf").write_text("workflow { }\n")
    base = {"local": {"directory": str(tmp_path), "script": "main.nf"},
            "pinned": {"directory": str(tmp_path), "script": "main.nf", "nextflow_version": "24.04.4"},
            "remote": {"pipeline": "org/repo", "revision": "v1", "args": {"dynamic": {
                "input": {"type": "path"}, "n": {"type": "number", "value": 1}}}}}
    base.update(pipelines)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lease_seconds": 2, "nextflow_workflows": {k: v for k, v in base.items() if v}}))
    return str(path)


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path, config=write_config(tmp_path)).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def workflow(api, pipeline, **arguments):
    wid = api.create(pipeline)
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": pipeline, "nextflow_arguments": arguments})
    assert resp.status == 200, resp
    return wid


def post_started(server, api, wid, run_id, workflow_metadata):
    """Nextflow's `started` post (NEXTFLOW.md 1.7), sent with the run's weblog secret as basicToken."""
    with sqlite3.connect(os.path.join(server.data, "nfapi.sqlite3")) as db:
        secret = db.execute("SELECT secret FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    body = {"runName": "nfapi-run-%d" % run_id, "runId": SESSION, "event": "started", "utcTime": "2025-01-20T12:05:00Z",
            "metadata": {"parameters": {}, "workflow": workflow_metadata}}
    resp = api.request("POST", "/api/workflows/%d/nextflow-log?run=%d" % (wid, run_id), body=body, token=False,
                       headers={"Authorization": "Basic " + base64.b64encode(b"nfapi:" + secret.encode()).decode()})
    assert resp.status == 200, resp


def run_of(api, wid, run_id):
    return api.get("/api/workflows/%d/runs/%d" % (wid, run_id)).json()["run"]


# The worker asks `nextflow -version` once at start: the stubs answer it without recording a run.
STUB_VERSION = '#!/bin/sh\n[ "$1" = -version ] && { echo "      version 24.10.0 build 5928"; exit 0; }\n'


def test_pinned_version_is_in_the_launch_and_nextflow_gets_it_as_nxf_ver_only(server, tmp_path):
    api = server.client()
    record = tmp_path / "nextflow-saw"
    stub = tmp_path / "nextflow"
    stub.write_text(STUB_VERSION + 'echo "NXF_VER=${NXF_VER:-unset} ARGV=$*" >> "$STUB_RECORD"\n')
    stub.chmod(0o755)
    worker = WorkerProcess(server, tmp_path, nextflow=str(stub), env={"STUB_RECORD": str(record)})
    worker.env.pop("NXF_VER", None)
    worker.start()
    try:
        pinned, plain = workflow(api, "pinned"), workflow(api, "local")
        run_id = schedule(api, pinned)
        assert run_of(api, pinned, run_id)["pinned_nextflow_version"] == "24.04.4"
        assert wait_final(api, pinned)["status"] == "succeeded"
        schedule(api, plain)
        assert wait_final(api, plain)["status"] == "succeeded"
    finally:
        worker.stop()
    saw = record.read_text().splitlines()
    assert [line.split()[0] for line in saw] == ["NXF_VER=24.04.4", "NXF_VER=unset"]
    assert "24.04.4" not in saw[0].split(" ARGV=")[1]


@pytest.mark.parametrize("framework_present", [False, True])
def test_a_pinned_version_missing_offline_fails_the_run_before_nextflow_starts(server, tmp_path, framework_present):
    api = server.client()
    nxf_home = tmp_path / "nxf-home"
    if framework_present:
        (nxf_home / "framework" / "24.04.4").mkdir(parents=True)
        (nxf_home / "framework" / "24.04.4" / "nextflow-24.04.4-one.jar").write_text("jar")
    record = tmp_path / "nextflow-saw"
    stub = tmp_path / "nextflow"
    stub.write_text(STUB_VERSION + 'echo started >> "$STUB_RECORD"\n')
    stub.chmod(0o755)
    worker = WorkerProcess(server, tmp_path, nextflow=str(stub), env={
        "STUB_RECORD": str(record), "NXF_OFFLINE": "true", "NXF_HOME": str(nxf_home)}).start()
    try:
        wid = workflow(api, "pinned")
        schedule(api, wid)
        run = wait_final(api, wid)["run"]
    finally:
        worker.stop()
    if framework_present:
        assert run["status"] == "succeeded" and record.exists()
    else:
        assert run["status"] == "failed" and not record.exists()
        assert "pinned to Nextflow 24.04.4" in run["error_message"]
        assert "NXF_VER=24.04.4 nextflow -version" in run["error_message"]


def test_started_records_what_ran_and_only_well_formed_values(server):
    api = server.client()
    wid = workflow(api, "remote")
    assert api.upload(wid, "in.txt", b"x").status == 200
    api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"input": "in.txt"}})
    run_id = schedule(api, wid)
    launch = claim_and_confirm(api)
    assert launch["argv"][launch["argv"].index("-r") + 1] == "v1" and launch["nextflow_version"] is None
    post_started(server, api, wid, run_id, {"nextflow": {"version": "24.10.4 $(id)", "build": 5934},
                                            "commitId": "--upload-pack=evil", "revision": "v1"})
    run = run_of(api, wid, run_id)
    assert (run["nextflow_version"], run["commit_id"], run["revision"]) == (None, None, "v1")
    post_started(server, api, wid, run_id, {"nextflow": {"version": "24.10.4", "build": 5934},
                                            "commitId": COMMIT, "revision": "v1"})
    run = run_of(api, wid, run_id)
    assert (run["nextflow_version"], run["commit_id"], run["revision"]) == ("24.10.4", COMMIT, "v1")
    report_finished(api, launch)


def test_relaunch_repeats_the_run_exactly(server):
    """The workflow's arguments change after the run; the relaunch still runs the old ones, on the
    commit and Nextflow version that ran. 409 while a run is active."""
    api = server.client()
    wid = workflow(api, "remote")
    for name in ("a.txt", "b.txt"):
        assert api.upload(wid, name, b"x").status == 200
    api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"input": "a.txt", "n": 1}})
    first = schedule(api, wid)
    launch = claim_and_confirm(api)
    post_started(server, api, wid, first, {"nextflow": {"version": "24.10.4"}, "commitId": COMMIT})
    report_finished(api, launch)
    api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"input": "b.txt", "n": 5}})

    resp = api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, first))
    assert resp.status == 200, resp
    run = resp.json()["run"]
    assert (run["status"], run["pipeline"], run["revision"], run["pinned_nextflow_version"], run["resume"]) == \
        ("queued", "remote", COMMIT, "24.10.4", False)
    assert api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, first)).status == 409
    again = claim_and_confirm(api)
    assert again["run_id"] == run["id"] and again["params"] == launch["params"]
    assert again["argv"][again["argv"].index("-r") + 1] == COMMIT and again["nextflow_version"] == "24.10.4"
    assert "-resume" not in again["argv"]
    report_finished(api, again, exit_code=1)

    # -resume takes the session of the run relaunched; a run that never reported one cannot resume.
    resp = api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, run["id"]), {"resume": True})
    assert resp.status == 422 and "resume" in resp.json()["errors"]
    resp = api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, first), {"resume": True})
    assert resp.status == 200 and resp.json()["run"]["resume"] is True
    resumed = claim_and_confirm(api)
    assert resumed["argv"][resumed["argv"].index("-resume") + 1] == SESSION
    report_finished(api, resumed)


def test_relaunch_checks_the_files_and_the_pipeline_again(server, tmp_path):
    api = server.client()
    wid = workflow(api, "remote")
    assert api.upload(wid, "a.txt", b"x").status == 200
    api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"input": "a.txt"}})
    first = schedule(api, wid)
    report_finished(api, claim_and_confirm(api))
    assert api.post("/api/workflows/%d/runs/99/relaunch" % wid).status == 404
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "a.txt"}).status == 200
    resp = api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, first))
    assert resp.status == 422 and "a.txt does not exist" in resp.json()["errors"]["input"][0]
    assert api.upload(wid, "a.txt", b"x").status == 200

    server.stop()
    server.config = write_config(tmp_path, remote=None)
    server.start()
    api = server.client()
    resp = api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, first))
    assert resp.status == 422 and "no longer configured" in resp.json()["errors"]["run"][0]
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["id"] == first  # nothing was queued


def test_pinned_version_must_be_a_version(tmp_path):
    import nfapi
    path = write_config(tmp_path, pinned={"directory": str(tmp_path), "script": "main.nf", "nextflow_version": "latest"})
    with pytest.raises(nfapi.ConfigError) as err:
        nfapi.load_config(path)
    assert "nextflow_workflows.pinned.nextflow_version: must be a Nextflow version such as 24.10.4" in str(err.value)

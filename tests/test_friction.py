"""What a first user and a bash + curl script run into: the README's commands as written, the demo,
and answers a script can use (the new run, either case, typos refused, UTF-8)."""

import json
import os
import shutil
import signal
import subprocess
import tarfile
import zipfile

import pytest

import nfapi
from conftest import PYTHON, ROOT, wait_final

PIPELINE = "Hello World (Local)"
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")


def published_run(stand):
    """A worker whose stand-in publishes results/, and workflow 1 run to its end the README's way."""
    stand.worker(env={"FAKE_NF_PUBLISH": "1"})
    api = stand.client()
    wid = api.create("first try")
    demo = os.path.join(ROOT, "examples", "demo", "data")
    for name, folder in (("reference.fa", ""), ("sample1.fastq", "reads"), ("sample2.fastq", "reads")):
        with open(os.path.join(demo, folder, name), "rb") as f:
            assert api.upload(wid, name, f.read(), directory=folder).status == 200
    assert api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE, "nextflow_arguments": {
        "reference": "reference.fa", "extra_files": ["reference.fa"], "reads": "reads/*.fastq"}}).status == 200
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    assert wait_final(api, wid)["status"] == "succeeded"
    return api, wid


# ==== The README and the demo, run as written ====

def readme_download_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.startswith("curl ") and "/download?" in line]


@needs_curl
def test_readme_download_commands_work_and_resume(stand, tmp_path):
    api, wid = published_run(stand)
    assert wid == 1  # the README's commands name workflow 1
    lines = readme_download_lines()
    assert len(lines) == 3 and "-C - -o summary.txt" in lines[0]
    script = 'set -e\nauth=(-H "Authorization: Bearer $TOKEN")\nAPI=$URL/api\n' + "\n".join(lines) + "\n"
    out = tmp_path / "downloads"
    out.mkdir()

    def run():
        subprocess.run(["bash", "-c", script], cwd=str(out), check=True, timeout=60,
                       env=dict(os.environ, TOKEN=stand.token, URL=stand.url))
    run()
    summary = (out / "summary.txt").read_bytes()
    assert b"SUMMARY (1)" in summary
    with zipfile.ZipFile(str(out / "results.zip")) as z:
        assert {"results/summary.txt", "results/count_lines.txt"} <= set(z.namelist())
    with tarfile.open(str(out / "results.tar.gz")) as t:
        assert "results/summary.txt" in t.getnames()
    (out / "summary.txt").write_bytes(summary[:10])  # a download cut off: the same line resumes it
    for name in ("results.zip", "results.tar.gz"):
        os.unlink(str(out / name))
    run()
    assert (out / "summary.txt").read_bytes() == summary


@needs_curl
def test_walkthrough_script_works_with_the_curl_of_rhel_8(stand, tmp_path):
    stand.worker(env={"FAKE_NF_PUBLISH": "1"})
    # curl 7.61 as far as the script can tell: no --fail-with-body (7.76).
    old_curl = tmp_path / "bin" / "curl"
    old_curl.parent.mkdir()
    old_curl.write_text('#!/bin/bash\nfor a; do [ "$a" = --fail-with-body ] && { echo "curl: option --fail-with-body: '
                        'is unknown" >&2; exit 2; }; done\nexec %s "$@"\n' % shutil.which("curl"))
    old_curl.chmod(0o755)
    token_file = tmp_path / "token"
    token_file.write_text(stand.token)
    env = {k: v for k, v in os.environ.items() if k != "NFAPI_TOKEN"}
    env["PATH"] = "%s:%s" % (old_curl.parent, env["PATH"])
    proc = subprocess.run([os.path.join(ROOT, "examples", "walkthrough.sh"), stand.url, str(token_file),
                           str(tmp_path / "downloads")], env=env, timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.decode()
    assert proc.returncode == 0, output
    assert "status: succeeded" in output
    assert sorted(os.listdir(str(tmp_path / "downloads"))) == ["results.tar.gz", "results.zip", "summary.txt"]


@needs_curl
@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_demo_runs_end_to_end_and_downloads_the_results(tmp_path):
    for name in ("Makefile", "nfapi.py", "nfapi_worker.py", "example-config.json"):
        shutil.copy(os.path.join(ROOT, name), str(tmp_path))
    shutil.copytree(os.path.join(ROOT, "examples"), str(tmp_path / "examples"))
    (tmp_path / "tests").mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "fake_nextflow.py"), str(tmp_path / "tests"))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.Popen(["make", "-s", "demo", "PYTHON=" + PYTHON], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "make demo: the server listens on http://127.0.0.1:" in output and "status: succeeded" in output
    downloads = tmp_path / "demo-data" / "downloads"
    assert b"SUMMARY (1)" in (downloads / "summary.txt").read_bytes()
    assert "Traceback" not in output


def test_example_config_defaults_schedule_as_they_are(api):
    wid = api.create()
    assert api.upload(wid, "ref.fa", b">r\nACGT\n").status == 200
    assert api.upload(wid, "a.fastq", b"@r\nACGT\n").status == 200  # the default `reads` pattern
    # Only the one argument without a default.
    assert api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE,
                                                       "nextflow_arguments": {"reference": "ref.fa"}}).status == 200
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 200, resp


# ==== Answers a script can use ====

def test_schedule_answers_the_new_run(api):
    wid = api.create()
    api.upload(wid, "ref.fa", b">r\nACGT\n")
    api.upload(wid, "a.fastq", b"@r\nACGT\n")
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE,
                                                "nextflow_arguments": {"reference": "ref.fa"}})
    answer = api.post("/api/workflows/%d/schedule" % wid).json()
    assert answer["is_scheduled"] is True
    run = api.get("/api/workflows/%d/runs/%d" % (wid, answer["run"]["id"])).json()["run"]
    assert answer["run"] == run and run["status"] == "queued"


def test_task_status_filter_takes_either_case(stand):
    api, wid = published_run(stand)
    tasks = "/api/workflows/%d/runs/1/tasks?status=" % wid
    upper = api.get(tasks + "COMPLETED").json()["tasks"]
    assert len(upper) == 2
    assert api.get(tasks + "completed").json()["tasks"] == upper == api.get(tasks + "Completed").json()["tasks"]
    assert api.get(tasks + "failed").json()["tasks"] == []
    assert api.get(tasks + "done").status == 422


def json_routes():
    """Every route whose JSON body names its keys, with its path filled in."""
    for method, pattern, handler in nfapi.ROUTES:
        if isinstance(nfapi.DOCS[handler][1], dict) and nfapi.known_request_keys(handler):
            yield pattern.replace("<int:id>", "1").replace("<int:run_id>", "1")


def test_an_unknown_key_is_refused_by_every_json_endpoint_and_changes_nothing(api):
    wid = api.create("typo")
    assert wid == 1
    before = api.get("/api/workflows").json()
    routes = list(json_routes())
    assert len(routes) >= 9
    for path in routes:
        resp = api.post(path, {"nextflow_workflw": PIPELINE})
        assert resp.status == 422, (path, resp)
        assert list(resp.json()["errors"]) == ["nextflow_workflw"], (path, resp)
    resp = api.post("/api/workflows/1/update", {"nextflow_workflow": PIPELINE, "nextflow_arguments": {}, "x": 1})
    assert resp.json() == {"errors": {"x": ["unknown field; this request takes nextflow_workflow, nextflow_arguments, "
                                           "notify_email"]}}
    assert api.get("/api/workflows").json() == before


def test_answers_are_utf8_json(api, server):
    name = "Grüße aus Köln 🧬"
    resp = api.post("/api/workflows/create", {"name": name})
    assert name.encode("utf-8") in resp.body and b"\\u" not in resp.body
    wid = resp.json()["workflow"]["id"]
    # A file name that is not UTF-8 is left out of the listing (no client could name it back), and the
    # answer stays valid UTF-8 JSON.
    folder = os.path.join(server.data, "workflows", str(wid)).encode()
    open(os.path.join(folder, b"caf\xe9.txt"), "w").close()
    open(os.path.join(folder, "café.txt".encode()), "w").close()
    resp = api.get("/api/workflows/%d/files" % wid)
    assert resp.status == 200 and json.loads(resp.body.decode("utf-8"))["files"] == ["café.txt"]

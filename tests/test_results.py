"""Run history, tasks, logs, downloads and the OpenAPI document."""

import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

import nfapi
from conftest import ready_workflow, wait_final, wait_for


def test_run_history_and_tasks(stand):
    stand.worker()
    api = stand.client()
    wid = ready_workflow(api)
    assert api.get("/api/workflows/%d/runs" % wid).json() == {"runs": []}
    api.post("/api/workflows/%d/schedule" % wid)
    first = wait_final(api, wid)["run"]
    api.post("/api/workflows/%d/schedule" % wid, {"resume": True})
    second = wait_final(api, wid)["run"]
    runs = api.get("/api/workflows/%d/runs" % wid).json()["runs"]
    assert [r["id"] for r in runs] == [second["id"], first["id"]]
    assert runs[0] == second and runs[0]["resume"] is True and runs[1]["resume"] is False
    assert runs[1]["status"] == "succeeded" and runs[1]["submitted"] == 2 and runs[1]["cached"] == 0
    assert runs[0]["cached"] == 2 and runs[0]["session_id"] == runs[1]["session_id"]
    command = runs[1]["command"]
    assert command[:2] == ["run", os.path.join(nfapi.__file__.rsplit("/", 1)[0], "examples", "demo", "main.nf")]
    assert command[command.index("-c") + 1].endswith("/nfapi.config") and "-with-weblog" not in command
    assert runs[0]["command"][-2:] == ["-resume", runs[1]["session_id"]]
    assert api.get("/api/workflows/%d/runs?limit=1" % wid).json()["runs"] == [second]
    assert api.get("/api/workflows/%d/runs/%d" % (wid, first["id"])).json() == {"run": runs[1]}
    tasks = api.get("/api/workflows/%d/runs/%d/tasks" % (wid, first["id"])).json()["tasks"]
    assert [(t["task_id"], t["process"], t["status"], t["exit"], t["attempt"]) for t in tasks] == [
        (1, "COUNT_LINES", "COMPLETED", 0, 1), (2, "SUMMARY", "COMPLETED", 0, 1)]
    assert all(t["duration"] >= 0 and t["workdir"].startswith(os.path.join(stand.data, "launch")) for t in tasks)
    assert api.get("/api/workflows/%d/runs/%d/tasks?status=FAILED" % (wid, first["id"])).json()["tasks"] == []
    assert len(api.get("/api/workflows/%d/runs/%d/tasks?status=COMPLETED&limit=1" % (wid, first["id"])).json()["tasks"]) == 1
    assert api.get("/api/workflows/%d/runs/%d/tasks?status=done" % (wid, first["id"])).status == 422
    other = api.create("other")
    assert api.get("/api/workflows/%d/runs/%d" % (other, first["id"])).status == 404
    assert api.get("/api/workflows/%d/runs/999" % wid).status == 404
    assert api.get("/api/workflows/999/runs").status == 404


def test_follow_the_log_of_a_live_run(stand):
    stand.worker(env={"FAKE_NF_TASKS": "3", "FAKE_NF_TASK_SECONDS": "0.4"})
    api = stand.client()
    wid = ready_workflow(api)
    assert api.get("/api/workflows/%d/log" % wid).status == 404
    api.post("/api/workflows/%d/schedule" % wid)
    text, offset, polls, statuses = b"", 0, 0, set()
    while True:
        resp = api.get("/api/workflows/%d/log?offset=%d" % (wid, offset))
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        text += resp.body
        assert int(resp.headers["X-Next-Offset"]) == offset + len(resp.body)
        offset = int(resp.headers["X-Next-Offset"])
        statuses.add(resp.headers["X-Run-Status"])
        polls += 1
        if resp.headers["X-Run-Status"] in ("succeeded", "failed", "cancelled", "lost") and not resp.body:
            break
        wait_for(lambda: True)
    assert "running" in statuses and polls > 2
    run = api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]
    with open(os.path.join(stand.data, "runs", str(run["id"]), "console.log"), "rb") as f:
        assert text == f.read()
    assert b"Submitted process > SUMMARY (3)" in text
    tail = api.get("/api/workflows/%d/log?run=%d&offset=%d" % (wid, run["id"], len(text) - 10)).body
    assert tail == text[-10:]
    assert api.get("/api/workflows/%d/log?offset=%d" % (wid, len(text) + 1)).status == 416
    nextflow_log = api.get("/api/workflows/%d/log?file=nextflow" % wid)
    assert nextflow_log.status == 200 and b"$> nextflow run" in nextflow_log.body
    assert api.get("/api/workflows/%d/log?file=other" % wid).status == 422


@pytest.fixture
def files(api, server):
    wid = api.create("downloads")
    root = os.path.join(server.data, "workflows", str(wid))
    os.makedirs(os.path.join(root, "results", "sub"))
    with open(os.path.join(root, "results", "data.bin"), "wb") as f:
        f.write(bytes(range(256)) * 40)
    with open(os.path.join(root, "results", "sub", "notes ü.txt"), "w") as f:
        f.write("hello\n")
    os.makedirs(os.path.join(root, "results", "empty"))
    os.symlink("/etc", os.path.join(root, "results", "escape"))
    os.symlink("/etc/hostname", os.path.join(root, "results", "escape-file"))
    return wid, root


def test_download_a_file_with_ranges(api, files):
    wid, root = files
    url = "/api/workflows/%d/download?path=results/data.bin" % wid
    data = bytes(range(256)) * 40
    resp = api.get(url)
    assert resp.status == 200 and resp.body == data
    assert resp.headers["Content-Length"] == str(len(data)) and resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Content-Disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    assert resp.headers["Last-Modified"].endswith("GMT") and resp.headers["ETag"].startswith('"')
    size = len(data)
    for header, status, expected, content_range in [
        ("bytes=0-9", 206, data[:10], "bytes 0-9/%d" % size),
        ("bytes=10-", 206, data[10:], "bytes 10-%d/%d" % (size - 1, size)),
        ("bytes=-5", 206, data[-5:], "bytes %d-%d/%d" % (size - 5, size - 1, size)),
        ("bytes=-99999", 206, data, "bytes 0-%d/%d" % (size - 1, size)),
        ("bytes=100-99999", 206, data[100:], "bytes 100-%d/%d" % (size - 1, size)),
        ("bytes=%d-%d" % (size - 1, size - 1), 206, data[-1:], "bytes %d-%d/%d" % (size - 1, size - 1, size)),
        ("bytes=0-1,5-6", 200, data, None), ("bytes=5-2", 200, data, None), ("pages=1-2", 200, data, None),
    ]:
        resp = api.get(url, headers={"Range": header})
        assert (resp.status, resp.body, resp.headers["Content-Range"]) == (status, expected, content_range), header
    for header in ("bytes=%d-" % size, "bytes=99999-", "bytes=-0"):
        resp = api.get(url, headers={"Range": header})
        assert resp.status == 416 and resp.headers["Content-Range"] == "bytes */%d" % size, header
    etag = api.get(url).headers["ETag"]
    resp = api.get(url, headers={"If-None-Match": etag})
    assert resp.status == 304 and resp.body == b""
    resp = api.get("/api/workflows/%d/download?path=results/sub/notes%%20%%C3%%BC.txt" % wid)
    assert resp.body == b"hello\n"
    assert resp.headers["Content-Disposition"] == "attachment; filename=\"notes _.txt\"; filename*=UTF-8''notes%20%C3%BC.txt"


def test_download_errors(api, files):
    wid, root = files
    # "/etc/passwd" is <workflow folder>/etc/passwd: one leading "/" stands for the workflow folder.
    for path, status in [("missing.txt", 404), ("../../api-token", 422), ("/etc/passwd", 404), ("//etc/passwd", 422),
                         ("results/escape", 422), ("results/escape-file", 422), ("results/escape/hostname", 422),
                         ("%00", 422)]:
        resp = api.get("/api/workflows/%d/download?path=%s" % (wid, path))
        assert resp.status == status, (path, resp)
    assert api.get("/api/workflows/%d/download?path=results&format=rar" % wid).status == 422
    assert api.get("/api/workflows/999/download?path=x").status == 404


def test_download_folder_as_zip_and_tar(api, files, tmp_path):
    wid, root = files
    resp = api.get("/api/workflows/%d/download?path=results" % wid)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/zip"
    assert resp.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in resp.headers
    assert 'filename="results.zip"' in resp.headers["Content-Disposition"]
    archive = tmp_path / "results.zip"
    archive.write_bytes(resp.body)
    if shutil.which("unzip"):
        check = subprocess.run(["unzip", "-t", str(archive)], capture_output=True, text=True)
        assert check.returncode == 0 and "No errors detected" in check.stdout, check.stdout
    import zipfile
    with zipfile.ZipFile(str(archive)) as z:
        assert sorted(z.namelist()) == ["results/", "results/data.bin", "results/empty/", "results/sub/",
                                        "results/sub/notes ü.txt"]
        assert z.read("results/data.bin") == bytes(range(256)) * 40
    resp = api.get("/api/workflows/%d/download?path=results/sub&format=tar.gz" % wid)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(resp.body), mode="r:gz") as t:
        assert sorted(t.getnames()) == ["sub", "sub/notes ü.txt"]
        assert t.extractfile("sub/notes ü.txt").read() == b"hello\n"
    whole = api.get("/api/workflows/%d/download" % wid)
    assert whole.status == 200 and 'filename="workflow-%d.zip"' % wid in whole.headers["Content-Disposition"]
    # The connection stays usable after a chunked answer.
    assert api.get("/api/workflows/count").status == 200


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_resumes_an_interrupted_download(api, server, files, tmp_path):
    wid, root = files
    data = bytes(range(256)) * 40
    partial = tmp_path / "data.bin"
    partial.write_bytes(data[:1234])
    subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(partial), "-H", "Authorization: Bearer " + server.token,
                    "%s/api/workflows/%d/download?path=results/data.bin" % (server.url, wid)], check=True, timeout=30)
    assert partial.read_bytes() == data


def test_1gb_download_streams_with_flat_memory(api, server):
    wid = api.create("big")
    path = os.path.join(server.data, "workflows", str(wid), "big.bin")
    block, expected = os.urandom(1 << 20), hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(1024):
            chunk = bytes([i % 256]) + block[1:]
            expected.update(chunk)
            f.write(chunk)
    api.get("/api/workflows/%d/download?path=big.bin" % wid, headers={"Range": "bytes=0-0"})
    before = server.vm_hwm_kb()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("GET", "/api/workflows/%d/download?path=big.bin" % wid, headers={"Authorization": "Bearer " + server.token})
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == 1 << 30
    received = hashlib.sha256()
    for chunk in iter(lambda: resp.read(1 << 20), b""):
        received.update(chunk)
    conn.close()
    assert received.hexdigest() == expected.hexdigest()
    growth_mb = (server.vm_hwm_kb() - before) / 1024
    print("server peak memory growth during a 1 GB download: %.1f MB" % growth_mb)
    assert growth_mb < 30


def test_openapi_document_matches_the_router(api):
    doc = api.get("/api/openapi.json").json()
    assert doc == json.loads(json.dumps(nfapi.OPENAPI))
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    routed = {(method, path.replace("<int:", "<").replace("<", "{").replace(">", "}")) for method, path, _ in nfapi.ROUTES}
    assert documented == routed and len(routed) == len(nfapi.ROUTES)
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Errors"}
            assert {p["name"] for p in op["parameters"] if p["in"] == "path"} == set(
                part[1:-1] for part in path.split("/") if part.startswith("{"))
    import jsonschema
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

"""The one path rule, wherever a path is taken (issue 11 finding 8, issue 15 items 1-2).

Overlong names, very deep paths and symlink loops are 422, never a 500; one leading "/" means the
workflow folder; file changes wait while a run is queued or running; an upload whose workflow was
deleted meanwhile leaves nothing.
"""

import io
import os
import socket
import subprocess
import tarfile
import urllib.parse
import zipfile

import pytest

import nfapi
from conftest import multipart_body, wait_for

PIPELINE = "Hello World (Local)"


def quoted(path):
    return urllib.parse.quote(path, safe="")


def every_place(api, wid, path):
    """(place, answer) for `path` given to every endpoint that takes a path."""
    yield "files", api.get("/api/workflows/%d/files?dir=%s" % (wid, quoted(path)))
    yield "download", api.get("/api/workflows/%d/download?path=%s" % (wid, quoted(path)))
    yield "delete-path", api.post("/api/workflows/%d/delete-path" % wid, {"path": path})
    yield "create-folder", api.post("/api/workflows/%d/create-folder" % wid, {"path": path})
    yield "create-folder new_path", api.post("/api/workflows/%d/create-folder" % wid,
                                             {"new_path": path, "target_path": ""})
    yield "create-folder target_path", api.post("/api/workflows/%d/create-folder" % wid,
                                                {"new_path": "x", "target_path": path})
    yield "upload directory", api.upload(wid, "f.txt", b"x", directory=path)
    for name, value in (("reference", path), ("extra_files", [path]), ("reads", path)):
        yield "argument " + name, api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {name: value}})


def test_overlong_deep_and_looping_paths_are_422(api, server):
    wid = api.create("paths")
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE})
    root = os.path.join(server.data, "workflows", str(wid))
    os.symlink("loop", os.path.join(root, "loop"))
    for path in ("n" * 300, "a/" * 3000, "a/b/" + "c" * 256 + "/d", "loop/x", "loop/x/y"):
        for place, resp in every_place(api, wid, path):
            if path.startswith("loop") and place.startswith("argument"):
                assert resp.status == 200, (place, resp)  # stored: checked against the disk at schedule
                continue
            assert resp.status == 422, (path[:20], place, resp)
            assert "symlink" in str(resp.json()) if path.startswith("loop") else "long" in str(resp.json()), resp
    assert api.upload(wid, "n" * 300, b"x").status == 422
    resp = api.get("/api/workflows/%d/command" % wid)
    assert resp.status == 422 and "symlink" in resp.json()["errors"]["reference"][0], resp.json()
    assert resp.json()["errors"]["reads"] == ["matches no file in the workflow folder"]
    assert sorted(os.listdir(root)) == ["loop"]
    assert "Traceback" not in server.output()


@pytest.fixture
def deep_data(server):
    """The server's data folder, emptied with `rm -rf` at the end: pytest's own clean-up of old temp
    folders uses shutil.rmtree, which recurses once per level (a RecursionError on these folders)."""
    yield server.data
    server.stop()
    subprocess.run(["rm", "-rf", server.data], check=True)


def test_deep_folders_are_no_problem(api, server, deep_data):
    """1,500 levels: os.makedirs, os.walk and shutil.rmtree recursed once per level (RecursionError)."""
    wid = api.create("deep")
    deep = "d/" * 1500
    assert api.post("/api/workflows/%d/create-folder" % wid, {"path": deep}).status == 200
    assert api.upload(wid, "bottom.txt", b"deep", directory=deep).status == 200
    assert api.get("/api/workflows/%d/files?dir=%s" % (wid, quoted(deep))).json() == {"folders": [], "files": ["bottom.txt"]}
    assert api.get("/api/workflows/%d/download?path=%s" % (wid, quoted(deep + "bottom.txt"))).body == b"deep"
    api.upload(wid, "top.txt", b"top")
    resp = api.get("/api/workflows/%d/download" % wid)
    with zipfile.ZipFile(io.BytesIO(resp.body)) as z:
        names = z.namelist()
    resp = api.get("/api/workflows/%d/download?format=tar.gz" % wid)
    with tarfile.open(fileobj=io.BytesIO(resp.body), mode="r:gz") as t:
        assert sorted(n.rstrip("/") for n in names) == sorted(t.getnames())
    top = "workflow-%d/" % wid
    assert names[:2] == [top, top + "top.txt"] and names[-1] == top + "d/" * nfapi.MAX_ARCHIVE_DEPTH
    wait_for(lambda: "deeper than %d folders" % nfapi.MAX_ARCHIVE_DEPTH in server.output(), message="a note in the log")
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "d"}).status == 200
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": ["top.txt"]}


def test_one_leading_slash_means_the_workflow_folder(api, server):
    """nf-cloud's UI sends `/reads/`, `/sample2.fastq` and `{"new_path", "target_path"}`."""
    wid = api.create("ui")
    root = os.path.join(server.data, "workflows", str(wid))
    resp = api.post("/api/workflows/%d/create-folder" % wid, {"new_path": "reads", "target_path": ""})
    assert resp.status == 200
    for body in ({"new_path": "run1", "target_path": "/reads/"}, {"new_path": "/run2/", "target_path": "reads"},
                 {"path": "/reads/run3/"}):
        assert api.post("/api/workflows/%d/create-folder" % wid, body).status == 200, body
    assert sorted(os.listdir(os.path.join(root, "reads"))) == ["run1", "run2", "run3"]
    for body in ({}, {"target_path": "reads"}, {"new_path": ""}, {"new_path": "/", "target_path": ""},
                 {"new_path": 5, "target_path": ""}, {"new_path": "a", "target_path": 5}):
        resp = api.post("/api/workflows/%d/create-folder" % wid, body)
        assert resp.status == 422, (body, resp)
    assert api.upload(wid, "sample1.fastq", b"@1", directory="/reads/").status == 200
    assert api.upload(wid, "sample2.fastq", b"@2", directory="/").status == 200
    assert api.upload(wid, "ref.fa", b">r").status == 200
    assert api.get("/api/workflows/%d/files?dir=%%2Freads%%2F" % wid).json() == {
        "folders": ["run1", "run2", "run3"], "files": ["sample1.fastq"]}
    assert api.get("/api/workflows/%d/download?path=/reads/sample1.fastq" % wid).body == b"@1"
    # Argument values are stored without the leading slash: both spellings are the same value.
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE, "nextflow_arguments": {
        "reference": "/ref.fa", "extra_files": ["/reads/sample1.fastq", "sample2.fastq"], "reads": "/reads/*.fastq"}})
    assert resp.status == 200, resp
    arguments = api.get("/api/workflows/%d" % wid).json()["workflow"]["nextflow_arguments"]
    assert (arguments["reference"]["value"], arguments["extra_files"]["value"], arguments["reads"]["value"]) == (
        "ref.fa", ["reads/sample1.fastq", "sample2.fastq"], "reads/*.fastq")
    params = api.get("/api/workflows/%d/command" % wid).json()["params"]
    assert params["reference"] == os.path.join(root, "ref.fa")
    assert params["reads"] == os.path.join(root, "reads", "*.fastq")
    # Still refused: two leading slashes, '..' in any spelling, NUL, and the folder itself.
    for path in ("//etc", "//x", "/..", "/./..", "/../x", "..", "/reads/../..", "a\x00b"):
        for place, resp in every_place(api, wid, path):
            assert resp.status == 422, (path, place, resp)
    for path in ("/", "//", "", "/./"):
        resp = api.post("/api/workflows/%d/delete-path" % wid, {"path": path})
        assert resp.status == 422, (path, resp)
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "/sample2.fastq"}).status == 200
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "/reads/"}).status == 200
    assert api.get("/api/workflows/%d/files?dir=/" % wid).json() == {"folders": [], "files": ["ref.fa"]}


def test_file_changes_wait_while_a_run_is_queued(api, server):
    wid = api.create("busy")
    api.upload(wid, "ref.fa", b">r")
    api.upload(wid, "a.fastq", b"@a")
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE,
                                                "nextflow_arguments": {"reference": "ref.fa", "extra_files": ["ref.fa"]}})
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    for resp in (api.upload(wid, "late.txt", b"x"),
                 api.post("/api/workflows/%d/delete-path" % wid, {"path": "ref.fa"}),
                 api.post("/api/workflows/%d/create-folder" % wid, {"path": "new"})):
        assert resp.status == 409 and "run" in resp.json()["errors"]["workflow"][0], resp
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": ["a.fastq", "ref.fa"]}
    assert api.get("/api/workflows/%d/download?path=ref.fa" % wid).body == b">r"
    assert api.post("/api/workflows/%d/cancel" % wid).status == 200
    assert api.upload(wid, "late.txt", b"x").status == 200


def test_upload_that_ends_after_its_workflow_was_deleted(api, server):
    wid = api.create("gone")
    body, ctype = multipart_body([("directory", None, b"sub/deeper"), ("file", "late.bin", b"z" * 400000)])
    head = ("POST /api/workflows/%d/upload-file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (wid, server.token, ctype, len(body))).encode()
    tmp = os.path.join(server.data, "tmp")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body[:200000])
        wait_for(lambda: os.listdir(tmp), message="the upload to be under way")
        assert api.post("/api/workflows/%d/delete" % wid).status == 200
        sock.sendall(body[200000:])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404 "), answer
    assert not os.path.exists(os.path.join(server.data, "workflows", str(wid)))
    wait_for(lambda: os.listdir(tmp) == [], message="the temp file to go")

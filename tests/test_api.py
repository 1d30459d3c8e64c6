"""Every endpoint of api.md: its success shape exactly as documented, and its error paths."""

import os

from conftest import multipart_body

WORKFLOW_KEYS = {"id", "name", "nextflow_arguments", "nextflow_workflow", "submitted_processes",
                 "completed_processes", "is_scheduled"}
PIPELINE = "Hello World (Local)"


def assert_workflow_shape(wf):
    assert WORKFLOW_KEYS <= set(wf)
    assert isinstance(wf["id"], int) and isinstance(wf["name"], str)
    assert isinstance(wf["nextflow_arguments"], dict) and isinstance(wf["nextflow_workflow"], str)
    assert isinstance(wf["submitted_processes"], int) and isinstance(wf["completed_processes"], int)
    assert isinstance(wf["is_scheduled"], bool)


def ready_workflow(api, name="ready"):
    wid = api.create(name)
    assert api.upload(wid, "ref.fa", b">r\nACGT\n").status == 200
    resp = api.post("/api/workflows/%d/update" % wid, {
        "nextflow_workflow": PIPELINE, "nextflow_arguments": {"reference": {"value": "ref.fa"}}})
    assert resp.status == 200, resp
    return wid


def test_create_get_list_count(api):
    resp = api.post("/api/workflows/create", {"name": "first"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    wf = resp.json()["workflow"]
    assert_workflow_shape(wf)
    assert wf["name"] == "first" and wf["nextflow_workflow"] == "" and wf["nextflow_arguments"] == {}
    assert wf["is_scheduled"] is False and wf["submitted_processes"] == 0
    second = api.create("second")
    assert api.get("/api/workflows/%d" % wf["id"]).json() == {"workflow": wf}
    listing = api.get("/api/workflows").json()
    assert list(listing) == ["workflows"]
    assert [w["id"] for w in listing["workflows"]] == [wf["id"], second]
    for w in listing["workflows"]:
        assert_workflow_shape(w)
    assert api.get("/api/workflows/count").json() == {"count": 2}


def test_list_offset_and_limit(api):
    ids = [api.create("w%d" % i) for i in range(5)]
    page = api.get("/api/workflows?offset=1&limit=2").json()["workflows"]
    assert [w["id"] for w in page] == ids[1:3]
    assert [w["id"] for w in api.get("/api/workflows?offset=4").json()["workflows"]] == ids[4:]
    assert api.get("/api/workflows?limit=0").json() == {"workflows": []}
    for bad in ("offset=-1", "limit=abc", "limit=1.5", "offset=", "limit=1%3B%20DROP%20TABLE%20workflows",
                "offset=%D9%A1"):
        resp = api.get("/api/workflows?" + bad)
        assert resp.status == 422, (bad, resp)
        assert list(resp.json()["errors"]) in (["offset"], ["limit"])
    assert api.get("/api/workflows/count").json() == {"count": 5}


def test_create_rejects_bad_names(api):
    for body in ({}, {"name": ""}, {"name": 5}, {"name": None}, {"name": "x" * 513}, {"name": ["a"]}):
        resp = api.post("/api/workflows/create", body)
        assert resp.status == 422, (body, resp)
        assert resp.json() == {"errors": {"name": [resp.json()["errors"]["name"][0]]}}
    assert api.post("/api/workflows/create", {"name": "x" * 512}).status == 200
    assert api.get("/api/workflows/count").json() == {"count": 1}


def test_bad_json_bodies(api):
    cases = [(b"{", 400), (b"[1, 2]", 422), (b'"name"', 422), (b"\xff\xfe", 400), (b'{"name": NaN}', 400),
             (b"[" * 100000, 400), (b'{"name": "\\ud800"}', 400), (b'{"name": "a\\uDC00b"}', 400)]
    for body, status in cases:
        resp = api.post("/api/workflows/create", body, headers={"Content-Type": "application/json"})
        assert resp.status == status, (body[:20], resp)
        assert "body" in resp.json()["errors"]
    assert api.get("/api/workflows/count").json() == {"count": 0}
    # An escaped surrogate pair is one character, and fine.
    resp = api.post("/api/workflows/create", b'{"name": "ok \\ud83d\\ude00"}', headers={"Content-Type": "application/json"})
    assert resp.status == 200 and resp.json()["workflow"]["name"] == "ok \U0001F600"


def test_json_body_limit(api):
    resp = api.post("/api/workflows/create", b'{"name": "' + b"x" * (1024 * 1024) + b'"}')
    assert resp.status == 413
    assert resp.json()["errors"]["body"]


def test_unknown_workflow_is_404_everywhere(api):
    for method, path in [("GET", "/api/workflows/999"), ("POST", "/api/workflows/999/update"),
                         ("POST", "/api/workflows/999/delete"), ("GET", "/api/workflows/999/files"),
                         ("POST", "/api/workflows/999/delete-path"), ("POST", "/api/workflows/999/create-folder"),
                         ("POST", "/api/workflows/999/schedule"), ("POST", "/api/workflows/999/upload-file")]:
        resp = api.request(method, path, body={"path": "x"} if path.endswith(("-path", "-folder")) else {})
        assert resp.status == 404, (path, resp)
        assert resp.json()["errors"]["workflow"]


def test_unknown_routes_and_methods(api):
    resp = api.get("/api/nope")
    assert resp.status == 404 and resp.json()["errors"]["path"]
    resp = api.get("/api/workflows/%D9%A1%D9%A2")  # Arabic-Indic digits are not an id
    assert resp.status == 404
    resp = api.get("/api/workflows/99999999999999999999999")
    assert resp.status == 404
    resp = api.post("/api/workflows")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = api.get("/api/workflows/create")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    resp = api.request("DELETE", "/api/workflows/1")
    assert resp.status == 405 and resp.json()["errors"]["method"]
    resp = api.request("HEAD", "/api/workflows")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = api.request("TRACE", "/api/workflows/1")
    assert resp.status == 405 and resp.json()["errors"]["method"]


def test_update_pipeline_and_arguments(api):
    wid = api.create("u")
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE})
    assert resp.status == 200 and resp.json() == {}
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    configured = api.get("/api/nextflow-workflows/Hello%20World%20(Local)/arguments").json()["arguments"]
    assert wf["nextflow_workflow"] == PIPELINE and wf["nextflow_arguments"] == configured
    # Values in either shape; the definition (type, desc) can never be changed by a client.
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {
        "min_length": {"type": "text", "desc": "hacked", "value": 42}, "title": "Hello", "extra_files": ["a", "b/c"]}})
    assert resp.status == 200, resp
    args = api.get("/api/workflows/%d" % wid).json()["workflow"]["nextflow_arguments"]
    assert args["min_length"] == dict(configured["min_length"], value=42)
    assert args["title"]["value"] == "Hello" and args["extra_files"]["value"] == ["a", "b/c"]
    assert args["reads"]["value"] == "*.fastq"


def test_update_errors_change_nothing(api):
    wid = api.create("u")
    for pipeline in ("No Such Pipeline", ["Hello World (Local)"], {"a": 1}, 5, None):
        resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": pipeline})
        assert resp.status == 422 and resp.json()["errors"]["nextflow_workflow"], (pipeline, resp)
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"title": "x"}})
    assert resp.status == 422 and resp.json()["errors"]["nextflow_workflow"]
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE})
    before = api.get("/api/workflows/%d" % wid).json()
    for args, field in [({"nope": 1}, "nope"), ({"min_length": "ten"}, "min_length"),
                        ({"min_length": True}, "min_length"), ({"title": 5}, "title"),
                        ({"reference": "//etc/passwd"}, "reference"), ({"reference": "../x"}, "reference"),
                        ({"extra_files": "a"}, "extra_files"), ({"extra_files": ["ok", "../../x"]}, "extra_files"),
                        ({"reads": "a/../../*"}, "reads")]:
        resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": dict({"title": "changed"}, **args)})
        assert resp.status == 422, (args, resp)
        assert list(resp.json()["errors"]) == [field]
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": []})
    assert resp.status == 422
    assert api.get("/api/workflows/%d" % wid).json() == before


def test_schedule(api):
    wid = api.create("s")
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 422 and resp.json()["errors"]["nextflow_workflow"]
    api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": PIPELINE})
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 422
    assert resp.json() == {"errors": {"reference": ["cannot be empty"],
                                      "reads": ["matches no file in the workflow folder"]}}
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["is_scheduled"] is False
    api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {
        "reference": "ref.fa", "extra_files": ["a.txt"]}})
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 422
    assert resp.json() == {"errors": {"reference": ["ref.fa does not exist"], "extra_files": ["a.txt does not exist"],
                                      "reads": ["matches no file in the workflow folder"]}}
    for name, folder in (("ref.fa", ""), ("a.txt", ""), ("r.fastq", "")):
        api.upload(wid, name, b"x", directory=folder)
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 200 and resp.json()["is_scheduled"] is True
    wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
    assert wf["is_scheduled"] is True and wf["status"] == "queued"
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 409
    for path, body in [("update", {"nextflow_arguments": {"title": "x"}}), ("delete", None)]:
        resp = api.post("/api/workflows/%d/%s" % (wid, path), body)
        assert resp.status == 409, (path, resp)
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["nextflow_arguments"]["title"]["value"] == "My demo run"


def test_delete_workflow(api, server):
    wid = api.create("d")
    api.upload(wid, "a.txt", b"hello", directory="sub")
    folder = os.path.join(server.data, "workflows", str(wid))
    assert os.path.isfile(os.path.join(folder, "sub", "a.txt"))
    resp = api.post("/api/workflows/%d/delete" % wid)
    assert resp.status == 200 and resp.json() == {}
    assert not os.path.exists(folder)
    assert api.get("/api/workflows/%d" % wid).status == 404
    assert api.get("/api/workflows/count").json() == {"count": 0}
    assert os.listdir(os.path.join(server.data, "tmp")) == []


def test_files_upload_folders(api, server):
    wid = api.create("f")
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": []}
    resp = api.upload(wid, "b.txt", b"bee")
    assert resp.status == 200 and resp.json() == {"directory": "", "file": "b.txt"}
    resp = api.upload(wid, "a.txt", b"ay", directory="/")
    assert resp.json() == {"directory": "/", "file": "a.txt"}
    resp = api.upload(wid, "r1.fq", b"@r\nACGT\n", directory="reads/run1")
    assert resp.json() == {"directory": "reads/run1", "file": "r1.fq"}
    resp = api.post("/api/workflows/%d/create-folder" % wid, {"path": "empty/nested"})
    assert resp.status == 200 and resp.body == b"" and resp.headers["Content-Length"] == "0"
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["empty", "reads"], "files": ["a.txt", "b.txt"]}
    assert api.get("/api/workflows/%d/files?dir=reads/run1" % wid).json() == {"folders": [], "files": ["r1.fq"]}
    assert api.get("/api/workflows/%d/files?dir=reads%%2Frun1" % wid).json()["files"] == ["r1.fq"]
    assert api.get("/api/workflows/%d/files?dir=missing" % wid).status == 404
    assert api.get("/api/workflows/%d/files?dir=a.txt" % wid).status == 422
    # Replacing a file is atomic: the new content, no temp file left.
    api.upload(wid, "a.txt", b"replaced")
    with open(os.path.join(server.data, "workflows", str(wid), "a.txt"), "rb") as f:
        assert f.read() == b"replaced"
    resp = api.post("/api/workflows/%d/delete-path" % wid, {"path": "reads"})
    assert resp.status == 200 and resp.body == b""
    resp = api.post("/api/workflows/%d/delete-path" % wid, {"path": "b.txt"})
    assert resp.status == 200
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["empty"], "files": ["a.txt"]}
    assert os.listdir(os.path.join(server.data, "tmp")) == []


def test_path_endpoint_errors(api):
    wid = api.create("p")
    api.upload(wid, "file.txt", b"x")
    for action in ("delete-path", "create-folder"):
        for body, status in [({}, 422), ({"path": 5}, 422), ({"path": ""}, 422), ({"path": "/"}, 422), ({"path": "."}, 422)]:
            resp = api.post("/api/workflows/%d/%s" % (wid, action), body)
            assert resp.status == status, (action, body, resp)
            assert resp.json()["errors"]["path"]
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "missing"}).status == 404
    assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "file.txt"}).status == 409
    assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "file.txt/sub"}).status == 409
    assert api.upload(wid, "x", b"1", directory="file.txt").status == 409
    api.post("/api/workflows/%d/create-folder" % wid, {"path": "dir"})
    assert api.upload(wid, "dir", b"1").status == 409
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["dir"], "files": ["file.txt"]}


def test_upload_errors(api, server):
    wid = api.create("e")
    url = "/api/workflows/%d/upload-file" % wid
    body, ctype = multipart_body([("directory", None, b"")])
    resp = api.post(url, body, headers={"Content-Type": ctype})
    assert resp.status == 422 and resp.json()["errors"]["file"]
    body, ctype = multipart_body([("file", None, b"no filename")])
    assert api.post(url, body, headers={"Content-Type": ctype}).status == 422
    assert api.post(url, b"x", headers={"Content-Type": "application/json"}).status == 400
    assert api.post(url, b"x", headers={"Content-Type": "multipart/form-data"}).status == 400
    for name in ("..", ".", "a/b", "a\\b", "nul\x00.txt"):
        resp = api.upload(wid, name, b"x")
        assert resp.status in (400, 422), (name, resp)
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": []}
    assert os.listdir(os.path.join(server.data, "tmp")) == []


def test_pipelines(api):
    assert api.get("/api/nextflow-workflows").json() == {"nextflow_workflows": [
        "Hello World (Local)", "Schema demo (Local)", "nf-core demo"]}
    args = api.get("/api/nextflow-workflows/Hello%20World%20(Local)/arguments").json()
    assert list(args) == ["arguments"]
    assert set(args["arguments"]) == {"reference", "extra_files", "reads", "min_length", "title"}
    assert args["arguments"]["min_length"] == {"type": "number", "desc": "Count lines at least this long", "value": 10,
                                               "required": True}
    assert "outdir" not in args["arguments"]  # static arguments are not the client's business
    assert api.get("/api/nextflow-workflows/nf-core%20demo/arguments").json()["arguments"]["input"]["type"] == "path"
    resp = api.get("/api/nextflow-workflows/Nope/arguments")
    assert resp.status == 404 and resp.json()["errors"]["nextflow_workflow"]
    assert api.get("/api/nextflow-workflows/%FF/arguments").status == 400

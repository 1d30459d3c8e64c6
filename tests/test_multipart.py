"""The incremental multipart parser, fed every way, and uploads through the running server."""

import hashlib
import http.client
import os
import socket

import pytest

import nfapi
from conftest import multipart_body, wait_for

BOUNDARY = "XbOuNdArY"


def parse(body, splits):
    """Feed `body` cut at `splits`; return [(name, filename, content)]."""
    parser = nfapi.MultipartParser(BOUNDARY.encode())
    parts, edges = [], [0] + list(splits) + [len(body)]
    for start, end in zip(edges, edges[1:]):
        for event in parser.feed(body[start:end]):
            if event[0] == "part":
                parts.append([event[1], event[2], b""])
            elif event[0] == "data":
                parts[-1][2] += event[1]
    parser.close()
    return [tuple(p) for p in parts]


SMALL = [("directory", None, b"sub/dir"), ("file", "a b.txt", b"line\r\n\r\n--XbOuNdAr\r\n--Xb\r\r\n\n")]


def test_every_split_of_a_small_body():
    body, _ = multipart_body(SMALL, BOUNDARY)
    expected = SMALL
    assert parse(body, []) == expected
    for cut in range(1, len(body)):
        assert parse(body, [cut]) == expected, cut
    assert parse(body, range(1, len(body))) == expected


def test_crlf_runs_and_near_boundaries_in_content():
    content = b"\r\n" * 1000 + b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n--" + b"\r" * 50 + b"end"
    body, _ = multipart_body([("file", "x.bin", content)], BOUNDARY)
    for size in (1, 3, 7, 64, 4096):
        assert parse(body, range(size, len(body), size)) == [("file", "x.bin", content)], size


def test_preamble_epilogue_and_empty_part():
    body = (b"preamble\r\n--XbOuNdArY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"e\"\r\n\r\n"
            b"\r\n--XbOuNdArY--\r\nepilogue")
    assert parse(body, []) == [("file", "e", b"")]


@pytest.mark.parametrize("body", [
    b"--XbOuNdArY\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end",
    b"--XbOuNdArY\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--XbOuNdArY",
    b"no delimiter at all",
    b"",
])
def test_truncated_bodies_fail_at_close(body):
    with pytest.raises(nfapi.ApiError) as err:
        parse(body, [])
    assert err.value.status == 400


@pytest.mark.parametrize("body", [
    b"--XbOuNdArY\r\nX-Other: 1\r\n\r\nx\r\n--XbOuNdArY--",
    b"--XbOuNdArY\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--XbOuNdArY--",
    b"--XbOuNdArY\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XbOuNdArY--",
    b"--XbOuNdArY\r\nno colon here\r\n\r\nx\r\n--XbOuNdArY--",
    b"--XbOuNdArYjunk\r\n",
    b"--XbOuNdArY\r\nContent-Disposition: form-data; name=\"a\"\r\nX: " + b"h" * 20000 + b"\r\n\r\nx",
    b"--XbOuNdArY\r\nContent-Disposition: form-data; name=\"\xff\"\r\n\r\nx\r\n--XbOuNdArY--",
])
def test_malformed_bodies_are_400(body):
    with pytest.raises(nfapi.ApiError) as err:
        parse(body, [])
    assert err.value.status == 400


def test_quoted_utf8_filename_with_spaces(api, server):
    wid = api.create("names")
    name = 'résumé "final" v2 — 数据.txt'
    resp = api.upload(wid, name, b"content", directory="dossier ü")
    assert resp.status == 200, resp
    assert resp.json() == {"directory": "dossier ü", "file": name}
    with open(os.path.join(server.data, "workflows", str(wid), "dossier ü", name), "rb") as f:
        assert f.read() == b"content"


def test_two_parts_in_either_order(api, server):
    wid = api.create("order")
    body, ctype = multipart_body([("file", "first.txt", b"1"), ("directory", None, b"late")])
    resp = api.post("/api/workflows/%d/upload-file" % wid, body, headers={"Content-Type": ctype})
    assert resp.json() == {"directory": "late", "file": "first.txt"}
    body, ctype = multipart_body([("file", "a", b"1"), ("file", "b", b"2")])
    assert api.post("/api/workflows/%d/upload-file" % wid, body, headers={"Content-Type": ctype}).status == 422
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": ["late"], "files": []}


def test_truncated_upload_leaves_nothing(api, server):
    wid = api.create("cut")
    body, ctype = multipart_body([("file", "cut.bin", b"z" * 500000)])
    head = ("POST /api/workflows/%d/upload-file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (wid, server.token, ctype, len(body))).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body[:300000])
    # A body that ends before its closing delimiter, though Content-Length matches.
    short, _ = multipart_body([("file", "cut2.bin", b"z" * 1000)], "B")
    short = short[:-10]
    resp = api.post("/api/workflows/%d/upload-file" % wid, short, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert resp.status == 400 and resp.json()["errors"]["body"]
    tmp = os.path.join(server.data, "tmp")
    wait_for(lambda: os.listdir(tmp) == [], message="temp files removed")
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": []}


def test_upload_limit(tmp_path):
    from conftest import ServerProcess, CONFIG
    import json
    config = json.load(open(CONFIG))
    config["max_upload_bytes"] = 1000
    for pipeline in config["nextflow_workflows"].values():
        if "directory" in pipeline:
            pipeline["directory"] = os.path.join(os.path.dirname(CONFIG), pipeline["directory"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    srv = ServerProcess(tmp_path, config=str(path)).start()
    try:
        api = srv.client()
        wid = api.create("limited")
        assert api.upload(wid, "small", b"x" * 100).status == 200
        resp = api.upload(wid, "big", b"x" * 5000)
        assert resp.status == 413 and resp.json()["errors"]["file"]
        assert api.get("/api/workflows/%d/files" % wid).json()["files"] == ["small"]
        assert os.listdir(os.path.join(srv.data, "tmp")) == []
    finally:
        srv.stop()


def test_200mb_upload_streams_with_flat_memory(api, server):
    wid = api.create("big")
    size, block = 200 * 1024 * 1024, os.urandom(1024 * 1024)
    api.upload(wid, "warmup", b"w" * 1000)
    before = server.vm_hwm_kb()
    boundary = "----bigboundary"
    head = ('--%s\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n' % boundary).encode()
    tail = ("\r\n--%s--\r\n" % boundary).encode()
    sent = hashlib.sha256()

    def body():
        yield head
        for i in range(size // len(block)):
            chunk = bytes([i % 256]) + block[1:]
            sent.update(chunk)
            yield chunk
        yield tail

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/api/workflows/%d/upload-file" % wid, body=body(), headers={
        "Authorization": "Bearer " + server.token, "Content-Length": str(len(head) + size + len(tail)),
        "Content-Type": "multipart/form-data; boundary=" + boundary})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    received = hashlib.sha256()
    with open(os.path.join(server.data, "workflows", str(wid), "big.bin"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            received.update(chunk)
    assert received.hexdigest() == sent.hexdigest()
    growth_mb = (server.vm_hwm_kb() - before) / 1024
    print("server peak memory growth during a 200 MB upload: %.1f MB" % growth_mb)
    assert growth_mb < 30

"""Authentication on every route, path traversal, file modes and raw-socket protocol behaviour."""

import os
import re
import socket
import stat

import nfapi
from conftest import ServerProcess, multipart_body


def concrete_path(pattern):
    return re.sub(r"<(int:)?(\w+)>", lambda m: "1" if m.group(1) else "Hello%20World%20(Local)", pattern)


def test_every_route_needs_the_token(api, server):
    wid = api.create("guarded")
    assert wid == 1
    api.upload(wid, "keep.txt", b"keep")
    assert len(nfapi.ROUTES) >= 13
    for method, pattern, handler in nfapi.ROUTES:
        if getattr(handler, "public", False):  # the web page and download links (tests/test_ui.py)
            continue
        path = concrete_path(pattern)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + server.token},
                        {"Authorization": "Bearer " + server.token[:-1]}, {"Authorization": "Bearer"}):
            resp = api.request(method, path, body={"path": "keep.txt", "name": "x"}, headers=headers, token=False)
            assert resp.status == 401, (method, path, headers, resp)
            assert resp.json()["errors"]["token"]
            assert resp.headers["WWW-Authenticate"].startswith("Basic" if path.endswith("nextflow-log") else "Bearer")
    # Unknown paths do not reveal themselves to a client without the token either.
    assert api.get("/api/secret-route", token=False).status == 401
    assert api.get("/api/workflows/count").json() == {"count": 1}
    assert api.get("/api/workflows/1/files").json()["files"] == ["keep.txt"]


def test_token_from_environment(tmp_path):
    srv = ServerProcess(tmp_path, env={"NFAPI_TOKEN": "s3cret-token"}).start()
    try:
        assert not os.path.exists(os.path.join(srv.data, "api-token"))
        assert srv.client().get("/api/workflows/count").status == 200
        assert "$NFAPI_TOKEN" in srv.output()
    finally:
        srv.stop()


def test_files_are_private(api, server):
    wid = api.create("private")
    api.upload(wid, "a.txt", b"x", directory="sub")
    data = server.data
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for name in ("api-token", "nfapi.sqlite3"):
        assert stat.S_IMODE(os.stat(os.path.join(data, name)).st_mode) == 0o600, name
    folder = os.path.join(data, "workflows", str(wid))
    assert stat.S_IMODE(os.stat(os.path.join(folder, "sub")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(folder, "sub", "a.txt")).st_mode) == 0o600


TRAVERSALS = [
    "..", "../", "../..", "../outside", "a/../../outside", "a/b/../../../outside", "./../outside",
    "//etc", "//etc/passwd", "///tmp", "/..", "/../outside", "/./..", "//x", "sub/../../outside", "sub/..",
    "....//..//outside", "../../../../../../../../tmp", "nul\x00byte", "a/\x00/b", "..\\outside",
    "a\\..\\..\\outside", "link-out", "link-out/inside", "link-out/../x", "new\nline", "tab\there", "../" * 40,
    "dotdot-link", "dotdot-link/sub",
]


def test_traversal_attempts_are_refused(api, server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("do not touch")
    wid = api.create("t")
    api.upload(wid, "inside.txt", b"in")
    root = os.path.join(server.data, "workflows", str(wid))
    os.symlink(str(outside), os.path.join(root, "link-out"))
    os.symlink("..", os.path.join(root, "dotdot-link"))
    before_outside = sorted(os.listdir(str(outside)))
    before_data = sorted(os.listdir(os.path.join(server.data, "workflows")))
    attempts = 0
    links = ("link-out", "dotdot-link")
    for path in TRAVERSALS:
        answers = [api.post("/api/workflows/%d/create-folder" % wid, {"path": path}),
                   api.post("/api/workflows/%d/create-folder" % wid, {"path": path + "/made"}),
                   api.post("/api/workflows/%d/delete-path" % wid, {"path": path + "/victim.txt"}),
                   api.upload(wid, "planted.txt", b"evil", directory=path)]
        if path not in links:  # deleting a symlink itself is fine: see below
            answers.append(api.post("/api/workflows/%d/delete-path" % wid, {"path": path}))
        for resp in answers:
            attempts += 1
            assert resp.status in (400, 404, 422), (path, resp)
            assert resp.json()["errors"], (path, resp)
        quoted = path.replace("\x00", "%00").replace("\n", "%0A").replace("\t", "%09").replace("\\", "%5C")
        resp = api.get("/api/workflows/%d/files?dir=%s" % (wid, quoted))
        attempts += 1
        assert resp.status in (400, 404, 422), (path, resp)
    for encoded in ("..%2foutside", "%2e%2e/outside", "%2E%2E%2F%2E%2E", "sub%2f..%2f..", "%2f%2fetc", "%2f..", "%00"):
        resp = api.get("/api/workflows/%d/files?dir=%s" % (wid, encoded))
        attempts += 1
        assert resp.status == 422, (encoded, resp)
    # Percent-encoded and unicode look-alikes that are *names*, not traversal, stay inside.
    for harmless in ("..%2foutside", "\u2025", "\uff0e\uff0e", "\u002e\u002e\u2024"):
        assert api.post("/api/workflows/%d/create-folder" % wid, {"path": harmless}).status in (200, 422)
    assert attempts >= 30 * 5
    # Deleting a symlink removes the link, never what it points to.
    for link in links:
        assert api.post("/api/workflows/%d/delete-path" % wid, {"path": link}).status == 200
        assert not os.path.lexists(os.path.join(root, link))
    assert sorted(os.listdir(str(outside))) == before_outside
    assert (outside / "victim.txt").read_text() == "do not touch"
    assert sorted(os.listdir(os.path.join(server.data, "workflows"))) == before_data
    assert not [p for p in os.listdir(os.path.join(server.data)) if p.startswith("made") or p == "planted.txt"]
    assert os.path.exists(os.path.join(root, "inside.txt"))
    for resp_name in ("planted.txt",):
        assert not os.path.exists(os.path.join(server.data, resp_name))
    assert os.listdir(os.path.join(server.data, "tmp")) == []


def test_one_leading_slash_stays_in_the_workflow_folder(api, server):
    """"/etc/passwd" names <workflow folder>/etc/passwd; the system's /etc is never touched."""
    wid = api.create("slash")
    root = os.path.join(server.data, "workflows", str(wid))
    etc_before = sorted(os.listdir("/etc"))
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "/etc/passwd"}).status == 404
    assert api.get("/api/workflows/%d/download?path=/etc/passwd" % wid).status == 404
    assert api.get("/api/workflows/%d/files?dir=/etc" % wid).status == 404
    assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "/etc"}).status == 200
    assert api.upload(wid, "planted.txt", b"mine", directory="/etc").status == 200
    assert api.get("/api/workflows/%d/files?dir=/etc/" % wid).json() == {"folders": [], "files": ["planted.txt"]}
    with open(os.path.join(root, "etc", "planted.txt"), "rb") as f:
        assert f.read() == b"mine"
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "/etc"}).status == 200
    assert os.listdir(root) == []
    assert sorted(os.listdir("/etc")) == etc_before and os.path.isfile("/etc/passwd")


def test_symlinks_inside_the_folder_are_not_followed(api, server):
    """Even one that stays inside: between a check and the use, it could be swapped for one that does not."""
    wid = api.create("links")
    api.upload(wid, "f.txt", b"x", directory="real")
    root = os.path.join(server.data, "workflows", str(wid))
    os.symlink("real", os.path.join(root, "alias"))
    resp = api.get("/api/workflows/%d/files?dir=alias" % wid)
    assert resp.status == 422 and "symlink" in resp.json()["errors"]["dir"][0]
    assert api.get("/api/workflows/%d/files?dir=real" % wid).json()["files"] == ["f.txt"]


def raw_request(port, data, read_until_close=True):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def test_protocol_errors_are_json(server):
    for data in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
                 b"BREW /api/workflows HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        answer = raw_request(server.port, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] (400|401|414|431) ", head), answer[:200]
        assert b"Content-Type: application/json" in head and b'"errors"' in body, answer[:300]
        assert b"<html" not in answer.lower()


def test_request_heads_are_parsed_strictly(server):
    auth = b"Authorization: Bearer " + server.token.encode() + b"\r\n"
    count = b"GET /api/workflows/count HTTP/1.1\r\nHost: x\r\n"
    create = b"POST /api/workflows/create HTTP/1.1\r\nHost: x\r\n" + auth
    for data in (create + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",  # repeated length
                 count + auth + b"X-Folded: a\r\n  b\r\n\r\n",  # obsolete line folding
                 count + auth + b"X-Space : a\r\n\r\n",  # space before the colon
                 count + auth + b"X-Cr: a\rb\r\n\r\n", count + auth + b"X-Nul: a\x00b\r\n\r\n",
                 count + auth + b"no colon here\r\n\r\n", b"GET /api/workflows/count HTTP/1.2\r\n" + auth + b"\r\n",
                 b"GET  /api/workflows/count HTTP/1.1\r\n" + auth + b"\r\n"):
        answer = raw_request(server.port, data)
        assert answer.startswith(b"HTTP/1.1 400 ") and b'"errors"' in answer, (data, answer[:200])
    assert raw_request(server.port, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    # A bad request after a HEAD on the same connection still gets its error body.
    answer = raw_request(server.port, b"HEAD /api/workflows/count HTTP/1.1\r\n" + auth + b"\r\nGARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"HTTP/1.1 400 " in answer and answer.endswith(b"}}"), answer
    # Lenient where RFC 9112 allows: bare LF line ends, empty lines before the request line,
    # any case in names; HTTP/1.0 closes the connection after the answer.
    answer = raw_request(server.port, b"\r\n\r\nGET /api/workflows/count HTTP/1.0\nhost: x\nauthorization: Bearer " +
                         server.token.encode() + b"\n\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"count": 0}'), answer
    assert raw_request(server.port, create + b"Connection: close\r\nContent-Length: 2\r\n\r\n{}").startswith(b"HTTP/1.1 422 ")


def test_expect_100_continue_is_refused_before_the_body(server):
    body, ctype = multipart_body([("file", "big.bin", b"x" * 10)])
    head = ("POST /api/workflows/1/upload-file HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
            "Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n" % ctype).encode()
    answer = raw_request(server.port, head)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert b"100 Continue" not in answer
    good = head.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nAuthorization: Bearer " + server.token.encode() + b"\r\n", 1)
    answer = raw_request(server.port, good.replace(b"Content-Length: 100000000", b"Content-Length: %d" % len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 "), answer[:200]


def test_early_answer_closes_keep_alive(server):
    # A 401 sent before the body was read must not let the body be parsed as the next request.
    smuggled = b"GET /api/workflows/count HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.token.encode() + b"\r\n\r\n"
    data = (b"POST /api/workflows/create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)) + smuggled
    answer = raw_request(server.port, data)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert b"Connection: close" in answer


def test_bad_content_length_and_chunked(server):
    auth = b"Authorization: Bearer " + server.token.encode() + b"\r\n"
    for framing, code in ((b"Content-Length: -1\r\n", b"400"), (b"Content-Length: 1e3\r\n", b"400"),
                          (b"Transfer-Encoding: chunked\r\n", b"411")):
        answer = raw_request(server.port, b"POST /api/workflows/create HTTP/1.1\r\nHost: x\r\n" + auth + framing +
                             b"\r\n5\r\nhello\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + code), answer[:100]

"""Short-lived download links: POST /api/workflows/<id>/download-link, then GET /api/download/<ticket>
with no token serves exactly what the download route serves for the bound path and format."""

import io
import os
import socket
import tarfile
import types
import zipfile

import pytest

import nfapi
from conftest import ServerProcess, write_config

SAME_HEADERS = ("Content-Type", "Content-Disposition", "ETag", "Last-Modified", "Accept-Ranges", "Content-Length",
                "Content-Range")


def link(api, wid, path, fmt=None):
    body = {"path": path} if fmt is None else {"path": path, "format": fmt}
    resp = api.post("/api/workflows/%d/download-link" % wid, body)
    assert resp.status == 200, resp
    assert resp.json()["expires_in"] == nfapi.DOWNLOAD_LINK_SECONDS
    url = resp.json()["url"]
    assert url.startswith("/api/download/") and len(url) > len("/api/download/") + 40
    return url


def test_a_link_serves_what_the_download_route_serves(api):
    wid = api.create("results")
    data = os.urandom(300 * 1024)
    api.upload(wid, "data.bin", data, directory="out")
    api.upload(wid, "notes.txt", b"notes", directory="out/sub")
    url = link(api, wid, "out/data.bin")
    direct = "/api/workflows/%d/download?path=out/data.bin" % wid
    for headers in ({}, {"Range": "bytes=1000-1999"}, {"Range": "bytes=-10"}):
        via_link, via_token = api.get(url, token=False, headers=headers), api.get(direct, headers=headers)
        assert via_link.status == via_token.status in (200, 206)
        assert via_link.body == via_token.body
        assert {h: via_link.headers[h] for h in SAME_HEADERS} == {h: via_token.headers[h] for h in SAME_HEADERS}
    assert api.get(url, token=False, headers={"Range": "bytes=1000-1999"}).body == data[1000:2000]
    etag = api.get(url, token=False).headers["ETag"]
    assert api.get(url, token=False, headers={"If-None-Match": etag}).status == 304
    assert api.get(url, token=False, headers={"Range": "bytes=999999999-"}).status == 416

    zipped = api.get(link(api, wid, "out"), token=False)
    assert zipped.status == 200 and zipped.headers["Content-Disposition"].startswith('attachment; filename="out.zip"')
    assert zipfile.ZipFile(io.BytesIO(zipped.body)).namelist() == ["out/", "out/data.bin", "out/sub/", "out/sub/notes.txt"]
    tarred = api.get(link(api, wid, "out/sub", "tar.gz"), token=False)
    assert tarred.headers["Content-Type"] == "application/gzip"
    assert tarfile.open(fileobj=io.BytesIO(tarred.body)).getnames() == ["sub", "sub/notes.txt"]
    everything = api.get(link(api, wid, ""), token=False)
    assert everything.headers["Content-Disposition"].startswith('attachment; filename="workflow-%d.zip"' % wid)


def test_a_link_is_bound_to_its_workflow_path_and_format(api):
    wid = api.create("bound")
    api.upload(wid, "mine.txt", b"mine")
    api.upload(wid, "other.txt", b"other")
    url = link(api, wid, "mine.txt")
    # Query parameters cannot point the ticket elsewhere.
    assert api.get(url + "?path=other.txt&format=tar.gz", token=False).body == b"mine"
    # The ticket is no token, and a token is no ticket.
    ticket = url.rsplit("/", 1)[1]
    assert api.get("/api/workflows/%d/download?path=other.txt" % wid, token=False,
                   headers={"Authorization": "Bearer " + ticket}).status == 401
    assert api.get("/api/download/" + api.token, token=False).status == 404
    assert link(api, wid, "mine.txt") != url  # random each time


def test_links_refuse_what_the_download_route_refuses(api):
    wid = api.create("refusals")
    api.upload(wid, "a.txt", b"a")
    for body, status, field in [({"path": "../a.txt"}, 422, "path"), ({"path": "//etc/passwd"}, 422, "path"),
                                ({"path": 5}, 422, "path"), ({"path": "missing.txt"}, 404, "path"),
                                ({"path": "a.txt", "format": "rar"}, 422, "format")]:
        resp = api.post("/api/workflows/%d/download-link" % wid, body)
        assert resp.status == status and field in resp.json()["errors"], (body, resp)
    assert api.post("/api/workflows/999/download-link", {"path": "a.txt"}).status == 404
    assert api.post("/api/workflows/%d/download-link" % wid, {"path": "a.txt"}, token=False).status == 401
    unknown = api.get("/api/download/" + "A" * 43, token=False)
    assert unknown.status == 404 and "ask for a new one" in unknown.json()["errors"]["ticket"][0]


def test_a_link_follows_no_symlink_put_in_after_it_was_made(api, server, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"not yours")
    wid = api.create("swapped")
    api.upload(wid, "a.txt", b"a")
    url = link(api, wid, "a.txt")
    path = os.path.join(server.data, "workflows", str(wid), "a.txt")
    os.unlink(path)
    os.symlink(str(secret), path)
    resp = api.get(url, token=False)
    assert resp.status == 422 and b"not yours" not in resp.body
    # Nor one to the workflow of somebody else.
    other = api.create("other")
    api.upload(other, "b.txt", b"other workflow")
    os.unlink(path)
    os.symlink(os.path.join(server.data, "workflows", str(other), "b.txt"), path)
    assert api.get(url, token=False).status == 422


def test_a_link_dies_with_its_workflow(api):
    wid = api.create("short-lived")
    api.upload(wid, "a.txt", b"a")
    url = link(api, wid, "a.txt")
    assert api.post("/api/workflows/%d/delete" % wid).status == 200
    assert api.get(url, token=False).status == 404


def test_the_read_only_token_may_make_links(tmp_path):
    srv = ServerProcess(tmp_path, env={"NFAPI_READ_TOKEN": "reader-token"}).start()
    try:
        api = srv.client()
        wid = api.create("shared")
        api.upload(wid, "a.txt", b"a")
        api.token = "reader-token"
        assert api.get(link(api, wid, "a.txt"), token=False).body == b"a"
        # Only that POST: the others stay refused to it.
        assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "x"}).status == 403
        assert api.post("/api/workflows/create", {"name": "x"}).status == 403
    finally:
        srv.stop()


def test_links_of_the_read_only_token_hold_at_most_half_the_slots(tmp_path):
    """A link is followed without a token, but it stands for the token that asked for it: downloads
    through the read-only token's links, read as slowly as their client likes, hold at most that
    token's half of max_connections (8 here), and the owner's requests still get through."""
    config = write_config(tmp_path, max_connections=8)
    srv = ServerProcess(tmp_path, config=config, env={"NFAPI_READ_TOKEN": "reader-token"}).start()
    downloads = []
    try:
        owner = srv.client()
        wid = owner.create("big")
        assert owner.upload(wid, "big.bin", bytes(32 << 20)).status == 200  # more than socket buffers hold
        reader = srv.client()
        reader.token = "reader-token"
        urls = [link(reader, wid, "big.bin") for _ in range(8)]
        owner.conn.close()  # a keep-alive connection between requests holds no slot, but be plain about it
        reader.conn.close()
        for url in urls:
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url.encode())
            downloads.append(sock)
        statuses = []
        for sock in downloads:
            first = b""
            while b"\r\n" not in first:
                first += sock.recv(1024)
            statuses.append(int(first.split()[1]))
        assert sorted(statuses) == [200] * 4 + [503] * 4, statuses
        assert srv.client().get("/api/workflows/count").status == 200
    finally:
        for sock in downloads:
            sock.close()
        srv.stop()


def test_links_expire_and_their_number_is_bounded(monkeypatch):
    clock = [1000.0]  # moved by the test alone: a stall of the test cannot expire a link early
    monkeypatch.setattr(nfapi, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(nfapi, "DOWNLOAD_LINK_SECONDS", 0.2)
    monkeypatch.setattr(nfapi, "MAX_DOWNLOAD_LINKS", 3)
    links = nfapi.DownloadLinks()
    tickets = [links.create(1, "a.txt", "zip", False) for _ in range(3)]
    assert links.find(tickets[0]) == (1, "a.txt", "zip", False)
    with pytest.raises(nfapi.ApiError) as refused:
        links.create(1, "a.txt", "zip", False)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    clock[0] += 0.2  # a link lives its lifetime, no longer
    for ticket in tickets:
        with pytest.raises(nfapi.ApiError) as gone:
            links.find(ticket)
        assert gone.value.status == 404
    fresh = links.create(1, "b.txt", "tar.gz", False)  # the expired ones made room
    assert list(links.tickets) == [fresh]
    links.create(1, "b.txt", "zip", True)  # the read-only token's share of 3: 1
    with pytest.raises(nfapi.ApiError) as refused:
        links.create(1, "b.txt", "zip", True)
    assert refused.value.status == 429
    links.create(1, "b.txt", "zip", False)  # the rest stays for the API token


def test_tickets_never_reach_the_log(tmp_path):
    srv = ServerProcess(tmp_path, quiet=False).start()
    try:
        api = srv.client()
        wid = api.create("logged")
        api.upload(wid, "a.txt", b"a")
        url = link(api, wid, "a.txt")
        assert api.get(url, token=False).status == 200
        assert api.get(url + "?x=1", token=False).status == 200
        log = srv.output()
        assert "GET /api/download/" in log, "requests are logged"
        assert url.rsplit("/", 1)[1] not in log
    finally:
        srv.stop()

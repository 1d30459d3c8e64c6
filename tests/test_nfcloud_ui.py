"""nf-cloud's own web UI against nfapi: its request sequence, exactly as it sends it (issue 15).

Once over the Unix socket with no token, as the UI reaches it through a forwarded port (its Origin
listed in cors_origins, Host localhost:3001), and once over TCP with the token.
"""

import json
import time
import urllib.parse

import pytest

from conftest import ServerProcess, UnixClient, WorkerProcess, multipart_body, write_config
from test_socketio import PATH, SEPARATOR, events, follow_with_python_socketio

UI_ORIGIN = "http://localhost:3000"
UI_HEADERS = {"Origin": UI_ORIGIN, "Host": "localhost:3001"}


@pytest.fixture
def stand(tmp_path):
    """A server on TCP and a Unix socket that lists the UI's origin, and a worker."""
    path = str(tmp_path / "sock" / "nfapi.sock")
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2, cors_origins=[UI_ORIGIN]),
                        args=["--unix-socket", path]).start()
    srv.socket_path = path
    worker = WorkerProcess(srv, tmp_path).start()
    try:
        yield srv
    finally:
        worker.stop()
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


class UI:
    """The requests nf-cloud's UI makes, with its shapes: leading-slash paths, multipart `file` and
    `directory`, `{new_path, target_path}`, the new workflow's `id` read at the top level."""

    def __init__(self, client, headers):
        self.client, self.headers = client, headers

    def call(self, method, path, body=None, headers=None):
        resp = self.client.request(method, path, body=body, headers=dict(self.headers, **(headers or {})),
                                   token=bool(self.client.token))
        assert resp.status == 200, (method, path, resp)
        return resp.json() if resp.body else None

    def create(self, name):
        return self.call("POST", "/api/workflows/create", {"name": name})["id"]

    def upload(self, wid, name, content, directory):
        body, ctype = multipart_body([("file", name, content), ("directory", None, directory.encode())])
        return self.call("POST", "/api/workflows/%d/upload-file" % wid, body, {"Content-Type": ctype})

    def files(self, wid, folder):
        return self.call("GET", "/api/workflows/%d/files?dir=%s" % (wid, urllib.parse.quote(folder, safe="")))

    def workflow(self, wid):
        return self.call("GET", "/api/workflows/%d" % wid)["workflow"]


def replay(ui, wid, follow):
    """Every step of the UI on workflow `wid`, then a run followed live by `follow(schedule)`."""
    ui.upload(wid, "ref.fa", b">r\nACGT\n", "")
    ui.upload(wid, "sample2.fastq", b"@r\nACGTACGTACGT\n", "/")
    ui.upload(wid, "sample1.fastq", b"@r\nACGTACGTACGT\n", "/reads/")
    assert ui.files(wid, "/reads/") == {"folders": [], "files": ["sample1.fastq"]}
    ui.call("POST", "/api/workflows/%d/create-folder" % wid, {"new_path": "reads2", "target_path": "/"})
    ui.call("POST", "/api/workflows/%d/create-folder" % wid, {"new_path": "x", "target_path": "reads"})
    assert ui.files(wid, "/") == {"folders": ["reads", "reads2"], "files": ["ref.fa", "sample2.fastq"]}
    assert ui.files(wid, "/reads/") == {"folders": ["x"], "files": ["sample1.fastq"]}
    arguments = {"reference": "/reads/sample1.fastq", "extra_files": ["/reads/sample1.fastq", "/ref.fa"],
                 "reads": "reads/*.fastq", "min_length": 12, "title": "from nf-cloud"}
    ui.call("POST", "/api/workflows/%d/update" % wid, {"nextflow_workflow": "Hello World (Local)",
                                                       "nextflow_arguments": arguments})
    stored = ui.workflow(wid)["nextflow_arguments"]
    assert stored["reference"]["value"] == "reads/sample1.fastq" and stored["reference"]["exists"] is True
    assert stored["extra_files"]["value"] == ["reads/sample1.fastq", "ref.fa"]
    ui.call("POST", "/api/workflows/%d/delete-path" % wid, {"path": "/sample2.fastq"})
    ui.call("POST", "/api/workflows/%d/delete-path" % wid, {"path": "/reads2/"})
    assert ui.files(wid, "/") == {"folders": ["reads"], "files": ["ref.fa"]}
    progress = follow(lambda: ui.call("POST", "/api/workflows/%d/schedule" % wid)["is_scheduled"])
    assert progress[0] == {"submitted_processes": 0, "completed_processes": 0}
    assert progress[-1] == {"submitted_processes": 2, "completed_processes": 2}
    workflow = ui.workflow(wid)
    assert workflow["status"] == "succeeded" and workflow["is_scheduled"] is False  # "Start" is possible again


def test_the_ui_over_the_unix_socket_without_a_token(stand):
    ui = UI(UnixClient(stand.socket_path), UI_HEADERS)
    wid = ui.create("nf-cloud")
    getter = UI(UnixClient(stand.socket_path), dict(UI_HEADERS, **{"Content-Type": "text/plain;charset=UTF-8"}))

    def follow(schedule):
        """Socket.IO by hand over the socket (python-socketio speaks TCP only), as the UI does."""
        handshake = getter.client.get(PATH, headers=UI_HEADERS)
        assert handshake.status == 200 and handshake.body.startswith(b"0"), handshake
        url = PATH + "&sid=" + json.loads(handshake.body[1:])["sid"]
        post = lambda packet: getter.client.post(url, packet.encode(), headers=getter.headers).body  # noqa: E731
        assert post("40") == b"ok" and getter.client.get(url, headers=UI_HEADERS).body.startswith(b"40")
        assert post('42["join",{"room":"workflow%d"}]' % wid) == b"ok"
        assert schedule() is True
        seen, deadline = [], time.monotonic() + 30
        while ["finished-workflow", {}] not in seen:
            assert time.monotonic() < deadline, seen
            packets = getter.client.get(url, headers=UI_HEADERS).body.decode().split(SEPARATOR)
            if "2" in packets:
                assert post("3") == b"ok"
            seen += events(packets)
        return [args for name, args in seen if name == "new-progress"]

    replay(ui, wid, follow)


def test_the_ui_over_tcp_with_the_token_and_python_socketio(stand):
    ui = UI(stand.client(), {"Origin": UI_ORIGIN})
    wid = ui.create("nf-cloud")

    def follow(schedule):
        return follow_with_python_socketio(stand, wid, schedule)

    replay(ui, wid, follow)

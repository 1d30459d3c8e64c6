"""Token-free access for the owner over a Unix socket (--unix-socket, issue 15)."""

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading

import pytest

from conftest import (CONFIG, PYTHON, ROOT, ServerProcess, UnixClient, WorkerProcess, ready_workflow,
                      serve_connections, wait_final, wait_for, write_config)
from test_ui import Page, browser  # noqa: F401 (a fixture)

UI_ORIGIN = "http://localhost:3000"


def unix_server(tmp_path, path=None, **settings):
    """A server that also listens on `path` (by default <tmp>/sock/nfapi.sock, in a folder it makes)."""
    path = path or str(tmp_path / "sock" / "nfapi.sock")
    config = write_config(tmp_path, **settings) if settings else CONFIG
    srv = ServerProcess(tmp_path, config=config, args=["--unix-socket", path]).start()
    srv.socket_path = path
    wait_for(lambda: "also listening on " + path in srv.output(), message="the Unix socket line")
    return srv


@pytest.fixture
def owned(tmp_path):
    srv = unix_server(tmp_path, cors_origins=[UI_ORIGIN])
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def start_server(tmp_path, path, data="data2"):
    """Run a second server on `path` to its end (it must exit at once): (exit code, output lines)."""
    done = subprocess.run([PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", CONFIG, "--data", str(tmp_path / data),
                           "--port", "0", "--unix-socket", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=20, cwd=str(tmp_path))
    return done.returncode, done.stdout.decode().splitlines()


def test_the_owner_needs_no_token_on_the_unix_socket(owned):
    path = owned.socket_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    client = UnixClient(path)
    assert client.get("/api/workflows").json() == {"workflows": []}
    assert client.get("/api/whoami").json() == {"read_only": False}
    created = client.post("/api/workflows/create", {"name": "over the socket"})
    assert created.status == 200, created
    assert client.get("/").status == 200  # the page
    # TCP still wants the token, and gets it.
    api = owned.client()
    assert api.get("/api/workflows", token=False).status == 401
    assert [w["name"] for w in api.get("/api/workflows").json()["workflows"]] == ["over the socket"]


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},  # a cross-site post from a page in the browser the socket is forwarded to
    {"Origin": "null"},  # a sandboxed page or a file
    {"Host": "evil.example:8000"},  # DNS rebinding: the page's own name, pointing at the forwarded port
    {"Host": "localhost.evil.example"},
    {"Origin": UI_ORIGIN, "Host": "10.0.0.5:3001"},
    {"Origin": "http://localhost:8001", "Host": "localhost:8000"},  # another local port's page
    {"Origin": "http://evil.example:8000", "Host": "evil.example:8000"},  # rebinding, same-origin to itself
], ids=["foreign-origin", "null-origin", "rebound-host", "lookalike-host", "listed-origin-foreign-host",
        "other-port-origin", "rebound-same-origin"])
def test_a_request_a_web_page_may_have_sent_needs_the_token(owned, headers):
    client = UnixClient(owned.socket_path, token=owned.token)
    refused = client.post("/api/workflows/create", {"name": "csrf"}, headers=headers)
    assert refused.status == 401 and "Unix socket" in refused.body.decode(), refused
    assert client.get("/api/workflows", headers=headers).status == 401
    assert client.get("/api/workflows", headers=headers, token=True).json() == {"workflows": []}
    assert client.post("/api/workflows/create", {"name": "with the token"}, headers=headers, token=True).status == 200


@pytest.mark.parametrize("headers", [{}, {"Origin": UI_ORIGIN, "Host": "localhost:3001"}, {"Host": "127.0.0.1:8000"},
                                     {"Host": "[::1]:8000"}, {"Host": "LOCALHOST"},
                                     # our own page through `ssh -L 8000:<socket>`: a POST carries its Origin
                                     {"Origin": "http://localhost:8000", "Host": "localhost:8000"}])
def test_loopback_hosts_and_listed_origins_need_no_token(owned, headers):
    resp = UnixClient(owned.socket_path).post("/api/workflows/create", {"name": "ok"}, headers=headers)
    assert resp.status == 200, resp
    if headers.get("Origin") == UI_ORIGIN:
        assert resp.headers["Access-Control-Allow-Origin"] == UI_ORIGIN


def test_a_connection_from_another_uid_is_refused_by_its_peer_credentials(tmp_path):
    # The folder is open and the socket 0666 for this test only, so that `nobody` can reach it and
    # only SO_PEERCRED can turn it away. /tmp/pytest-of-root is closed to nobody: a folder in /tmp.
    folder = tempfile.mkdtemp(prefix="nfapi-unix-")
    srv = unix_server(tmp_path, path=os.path.join(folder, "nfapi.sock"))
    try:
        os.chmod(folder, 0o755)
        os.chmod(srv.socket_path, 0o666)
        script = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(10)\ns.connect(sys.argv[1])\n"
                  "print('connected')\n"
                  "try:\n    s.sendall(b'GET /api/workflows HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n')\n"
                  "    print(repr(s.recv(1000)))\nexcept OSError as e:\n    print('closed', type(e).__name__)\n")
        nobody = pwd.getpwnam("nobody")
        # As `nobody` (subprocess's user= and group= need Python 3.9).
        done = subprocess.run(["/usr/bin/python3", "-c", script, srv.socket_path],
                              preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
        answer = done.stdout.decode()
        # It got through the file modes (connected), and was closed without an answer.
        assert done.returncode == 0 and answer.startswith("connected\n"), answer
        assert answer.split("\n")[1] in ("b''", "closed BrokenPipeError", "closed ConnectionResetError"), answer
        wait_for(lambda: "closed 1 connections to the Unix socket from other users" in srv.output(),
                 message="the refusal in the log")
        assert UnixClient(srv.socket_path).get("/api/workflows").status == 200  # the owner still gets in
    finally:
        srv.stop()
        shutil.rmtree(folder)


def test_a_stale_socket_is_replaced_and_removed_after_sigterm(tmp_path):
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    path = str(folder / "nfapi.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # what a killed server leaves: a socket file nobody listens on
    stale.close()
    srv = unix_server(tmp_path, path=path)
    try:
        assert UnixClient(path).get("/api/workflows").status == 200
    finally:
        srv.stop(signal.SIGTERM)
    assert srv.proc.returncode == 0 and not os.path.exists(path), srv.output()


def test_a_live_socket_makes_a_second_server_exit_in_one_line(owned, tmp_path):
    code, lines = start_server(tmp_path, owned.socket_path)
    assert code == 1 and lines == ["nfapi: another server listens on %s" % owned.socket_path]
    assert not os.path.exists(str(tmp_path / "data2"))
    assert UnixClient(owned.socket_path).get("/api/workflows").status == 200


@pytest.mark.parametrize("case", ["not-a-socket", "open-folder"])
def test_a_path_that_is_not_safe_is_refused_in_one_line(tmp_path, case):
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o755 if case == "open-folder" else 0o700)
    folder.chmod(0o755 if case == "open-folder" else 0o700)
    path = folder / "nfapi.sock"
    if case == "not-a-socket":
        path.write_text("my notes")
    code, lines = start_server(tmp_path, str(path))
    assert code == 1 and len(lines) == 1, lines
    assert ("is not a socket" if case == "not-a-socket" else "must be yours and closed to others") in lines[0]
    if case == "not-a-socket":
        assert path.read_text() == "my notes"


def test_a_worker_on_the_unix_socket_needs_no_token(tmp_path):
    srv = unix_server(tmp_path, lease_seconds=2)
    worker = WorkerProcess(srv, tmp_path, env={"NFAPI_TOKEN": ""}, args=["--server", "unix:" + srv.socket_path])
    try:
        worker.start()
        api = srv.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        workflow = wait_final(api, wid)
        assert workflow["status"] == "succeeded", (workflow, worker.output())
        # Nextflow posted its weblog over TCP, to the address the server listens on.
        record = next(iter(worker.records().values()))
        assert record["config"]["weblog"]["url"].startswith(srv.url + "/"), record["config"]["weblog"]
        assert api.get("/api/workflows/%d/runs/1/tasks" % wid).json()["tasks"], "no weblog event arrived"
    finally:
        worker.stop()
        srv.stop()
    assert "Traceback" not in srv.output() + worker.output()


class Forward:
    """What `ssh -N -L PORT:<socket> host` does on a laptop: a local TCP port whose connections go on
    to the Unix socket (opened by this process, so by the socket's owner, as sshd is)."""

    def __init__(self, path):
        self.path = path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://localhost:%d" % self.listener.getsockname()[1]
        serve_connections(self.listener, self.connect)

    def connect(self, near):
        far = socket.socket(socket.AF_UNIX)
        far.connect(self.path)
        for source, sink in ((near, far), (far, near)):
            threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def pump(source, sink):
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self):
        self.listener.close()


def test_our_page_through_a_forwarded_socket_needs_no_sign_in(owned, browser):  # noqa: F811
    forward = Forward(owned.socket_path)
    ui = Page(browser, forward)
    try:
        tab, expect = ui.tab, ui.expect
        tab.goto(forward.url + "/")
        expect(tab.get_by_role("heading", name="Workflows", exact=True)).to_be_visible()
        expect(tab.locator("#who")).to_contain_text("Unix socket")
        tab.get_by_label("Name").fill("Through ssh -L")
        tab.get_by_role("button", name="Create").click()  # a POST: the browser sends Origin http://localhost:<port>
        expect(tab.get_by_role("heading", name="Through ssh -L")).to_be_visible()
        tab.get_by_label("Upload files").set_input_files([{"name": "a.txt", "mimeType": "text/plain", "buffer": b"a"}])
        expect(tab.get_by_role("button", name="Delete a.txt")).to_be_visible()
        assert [w["name"] for w in UnixClient(owned.socket_path).get("/api/workflows").json()["workflows"]] == \
            ["Through ssh -L"]
    finally:
        ui.check_and_close()
        forward.close()

"""Test harness: the real server (and later the real worker) as subprocesses, spoken to over HTTP."""

import http.client
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get("NFAPI_TEST_PYTHON", sys.executable)
CONFIG = os.path.join(ROOT, "example-config.json")


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % message)
        time.sleep(interval)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:300])


class Client:
    """A keep-alive HTTP client with the API token set."""

    def __init__(self, port, token):
        self.port = port
        self.token = token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method, path, body=None, headers=None, token=True):
        all_headers = {"Authorization": "Bearer " + self.token} if token else {}
        all_headers.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        try:
            self.conn.request(method, path, body=body, headers=all_headers)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            raise
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return Response(resp.status, resp.headers, data)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def create(self, name="wf"):
        resp = self.post("/api/workflows/create", {"name": name})
        assert resp.status == 200, resp
        return resp.json()["workflow"]["id"]

    def upload(self, workflow_id, filename, content, directory=""):
        body, ctype = multipart_body([("directory", None, directory.encode()), ("file", filename, content)])
        return self.post("/api/workflows/%d/upload-file" % workflow_id, body, headers={"Content-Type": ctype})


def multipart_body(parts, boundary=None):
    """Encode [(name, filename or None, bytes)] as multipart/form-data, the way curl -F does."""
    boundary = boundary or "------------------------" + uuid.uuid4().hex[:16]
    out = []
    for name, filename, content in parts:
        disposition = 'form-data; name="%s"' % name
        if filename is not None:
            disposition += '; filename="%s"' % filename.replace('"', "%22")
        out.append(b"--" + boundary.encode() + b"\r\n")
        out.append(("Content-Disposition: %s\r\n" % disposition).encode())
        if filename is not None:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + content + b"\r\n")
    out.append(b"--" + boundary.encode() + b"--\r\n")
    return b"".join(out), "multipart/form-data; boundary=" + boundary


class ServerProcess:
    """nfapi.py on a free port with its own data folder; output goes to a file, never a pipe."""

    def __init__(self, tmp_path, config=CONFIG, env=None, args=()):
        self.tmp_path = tmp_path
        self.data = str(tmp_path / "data")
        self.log_path = str(tmp_path / "server.log")
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if k != "NFAPI_TOKEN"}
        self.env.update(env or {})
        self.args = list(args)
        self.proc = None
        self.port = None

    def start(self):
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", self.config, "--data", self.data,
             "--port", "0", "--quiet"] + self.args,
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.tmp_path))
        log.close()
        line = wait_for(self.listening_line, timeout=20, message="server start")
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
        return self

    def listening_line(self):
        if self.proc.poll() is not None:
            raise AssertionError("server exited %s:\n%s" % (self.proc.returncode, self.output()))
        for line in self.output()[self.log_offset:].splitlines():
            if line.startswith("nfapi listening on "):
                return line
        return None

    def output(self):
        with open(self.log_path, encoding="latin-1") as f:
            return f.read()

    @property
    def token(self):
        if "NFAPI_TOKEN" in self.env:
            return self.env["NFAPI_TOKEN"]
        with open(os.path.join(self.data, "api-token")) as f:
            return f.read().strip()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def client(self):
        return Client(self.port, self.token)

    def stop(self, sig=None):
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def vm_hwm_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture
def api(server):
    return server.client()

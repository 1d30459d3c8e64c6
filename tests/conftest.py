"""Test harness: the real server (and later the real worker) as subprocesses, spoken to over HTTP."""

import contextlib
import http.client
import http.server
import json
import re
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
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


def openapi_validators():
    """jsonschema validators for the success answer of each (method, path regex), from nfapi.OPENAPI."""
    import jsonschema
    import nfapi
    spec = nfapi.OPENAPI

    def validator(schema):
        return jsonschema.Draft202012Validator(dict(schema, components=spec["components"]))
    table = []
    for path, operations in spec["paths"].items():
        regex = re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)) + r"\Z")
        for method, operation in operations.items():
            table.append((method.upper(), regex, operation["responses"]))
    return table, validator(spec["components"]["schemas"]["Errors"]), validator


OPENAPI_TABLE = None


def check_against_openapi(method, path, status, headers, body):
    """Every answer the tests see must match the OpenAPI document the server publishes."""
    global OPENAPI_TABLE
    if OPENAPI_TABLE is None:
        OPENAPI_TABLE = openapi_validators()
    table, errors, validator = OPENAPI_TABLE
    path = path.split("?")[0]
    if status >= 400:
        assert headers.get("Content-Type") == "application/json", (method, path, status)
        errors.validate(json.loads(body))
        return
    operation = next((responses for m, regex, responses in table if m == method and regex.match(path)), None)
    assert operation is not None, "%s %s answered %d but is not in the OpenAPI document" % (method, path, status)
    assert str(status) in operation, "%s %s: status %d is not documented" % (method, path, status)
    content = operation[str(status)].get("content")
    if content is None:
        assert body == b"", (method, path, body[:100])
        return
    ctype = headers.get("Content-Type", "").split(";")[0]
    assert ctype in content, (method, path, ctype)
    if ctype == "application/json":
        validator(content[ctype]["schema"]).validate(json.loads(body))


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
            resp = self.exchange(method, path, body, all_headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server closes idle keep-alive connections (header_timeout): reconnect once, as
            # HTTP clients do with a stale pooled connection.
            self.reconnect()
            resp = self.exchange(method, path, body, all_headers)
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        # Left to the protocol rather than the document: 401 (security schemes), HEAD, CORS preflights.
        if resp.status != 401 and method not in ("HEAD", "OPTIONS"):
            check_against_openapi(method, path, resp.status, resp.headers, data)
        return Response(resp.status, resp.headers, data)

    def exchange(self, method, path, body, headers):
        try:
            self.conn.request(method, path, body=body, headers=headers)
            return self.conn.getresponse()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()
            raise

    def reconnect(self):
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.conn.timeout)

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


def stop_process(proc, sig, timeout):
    """Send `sig` to a started process that still runs; SIGKILL it if it outlives `timeout` seconds."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """nfapi.py on a free port with its own data folder; output goes to a file, never a pipe."""

    def __init__(self, tmp_path, config=CONFIG, env=None, args=(), quiet=True):
        self.tmp_path = tmp_path
        self.data = str(tmp_path / "data")
        self.log_path = str(tmp_path / "server.log")
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if k != "NFAPI_TOKEN"}
        self.env.update(env or {})
        self.args = list(args)
        self.quiet = quiet
        self.proc = None
        self.port = None

    def start(self):
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", self.config, "--data", self.data,
             "--port", "0"] + (["--quiet"] if self.quiet else []) + self.args,
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.tmp_path))
        log.close()
        line = wait_for(self.listening_line, timeout=20, message="server start")
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
        self.threads_at_start = self.threads()  # before any request: no handler thread yet
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

    def stop(self, sig=signal.SIGTERM):
        stop_process(self.proc, sig, 10)

    def status_number(self, name):
        """A number the kernel keeps on the server process in /proc/<pid>/status: VmHWM (kB), Threads..."""
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise AssertionError("no %s in /proc/%d/status" % (name, self.proc.pid))

    def vm_hwm_kb(self):
        return self.status_number("VmHWM")

    def threads(self):
        return self.status_number("Threads")

    def handler_threads(self):
        """Threads serving requests. They are pooled: one stays a while (THREAD_IDLE_SECONDS) after its
        answer and serves the next arrival, so a request adds a thread only when none is idle."""
        return self.threads() - self.threads_at_start

    def cpu_seconds(self):
        """The CPU time the server process has used so far, user and system."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture
def api(server):
    return server.client()


@contextlib.contextmanager
def old_database(tmp_path, version):
    """The data folder's database as a nfapi with only the first `version` migrations left it, open for the
    test to write that nfapi's rows; committed and closed at the end of the `with` block."""
    import nfapi
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = sqlite3.connect(str(data / "nfapi.sqlite3"))
    try:
        for script in nfapi.MIGRATIONS[:version]:
            for statement in nfapi.sql_statements(script):
                db.execute(statement)
        db.execute("PRAGMA user_version = %d" % version)
        yield db
        db.commit()
    finally:
        db.close()


FAKE_NEXTFLOW = os.path.join(ROOT, "tests", "fake_nextflow.py")
FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")


def write_config(tmp_path, **settings):
    """example-config.json with absolute pipeline folders and the given top-level settings."""
    with open(CONFIG) as f:
        config = json.load(f)
    for pipeline in config["nextflow_workflows"].values():
        if "directory" in pipeline:
            pipeline["directory"] = os.path.join(ROOT, pipeline["directory"])
    config.update(settings)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


class WorkerProcess:
    """nfapi_worker.py with the nextflow stand-in; every process it starts carries a marker variable."""

    def __init__(self, server, tmp_path, env=None, args=(), nextflow=FAKE_NEXTFLOW, name="worker"):
        self.server = server
        self.marker = uuid.uuid4().hex
        self.record_dir = tmp_path / ("record-" + name)
        self.record_dir.mkdir(exist_ok=True)
        self.log_path = str(tmp_path / (name + ".log"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NF_")}
        self.env.update(NFAPI_TOKEN=server.token, NFAPI_TEST_MARKER=self.marker, FAKE_NF_RECORD=str(self.record_dir),
                        FAKE_NF_TASK_SECONDS="0.05")
        self.env.update(env or {})
        self.args = ["--nextflow", nextflow, "--grace", "5"] + list(args)
        self.proc = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, os.path.join(ROOT, "nfapi_worker.py"), "--server", self.server.url] + self.args,
                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def output(self):
        with open(self.log_path, encoding="latin-1") as f:
            return f.read()

    def records(self):
        out = {}
        for name in os.listdir(str(self.record_dir)):
            with open(str(self.record_dir / name)) as f:
                out[name[:-5]] = json.load(f)
        return out

    def stop(self, sig=signal.SIGTERM):
        stop_process(self.proc, sig, 30)


def processes_with_marker(marker):
    """PIDs of live processes whose environment carries `marker` (nextflow and its tasks inherit it)."""
    found = []
    needle = ("NFAPI_TEST_MARKER=%s" % marker).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open("/proc/%s/stat" % pid) as s:
                        if s.read().split(")")[-1].split()[0] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def wait_final(api, wid, timeout=30):
    """Poll the workflow until its latest run is in a final state; return the workflow."""
    def final():
        wf = api.get("/api/workflows/%d" % wid).json()["workflow"]
        return wf if wf["status"] in FINAL_STATES else None
    return wait_for(final, timeout=timeout, interval=0.05, message="run of workflow %d to end" % wid)


def weblog_target(launch):
    """Where Nextflow before 23.10 posts a claimed run's weblog: the URL in its launch's config, with
    the run's secret in the query."""
    import fake_nextflow
    config = fake_nextflow.parse_config_text(launch["config_url_token"], launch["config_file"])
    return urllib.parse.urlsplit(config["weblog"]["url"])


def recorded_weblog_target(record):
    """The weblog URL of a run the stand-in recorded, with the run's secret in the query."""
    weblog = record["config"]["weblog"]
    secret = weblog["basicToken"].split(":", 1)[1] if "basicToken" in weblog else None
    return urllib.parse.urlsplit(weblog["url"] + ("&token=" + secret if secret else ""))


def ready_workflow(api, name="wf", title="My demo run", reads=2):
    wid = api.create(name)
    assert api.upload(wid, "ref.fa", b">r\nACGT\n").status == 200
    for i in range(reads):
        assert api.upload(wid, "s%d.fastq" % i, b"@r\nACGTACGTACGT\n", directory="reads").status == 200
    resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": "Hello World (Local)", "nextflow_arguments": {
        "reference": "ref.fa", "extra_files": ["ref.fa", "reads/s0.fastq"], "reads": "reads/*.fastq",
        "min_length": 12, "title": title}})
    assert resp.status == 200, resp
    return wid


def schedule(api, wid):
    """Schedule workflow `wid`; return the id of the run it queued."""
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    return api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["id"]


def claim_and_confirm(api):
    """Claim the next run as a worker would and confirm it; return its launch."""
    resp = api.post("/api/worker/claim", {"worker": "test", "wait": 0})
    assert resp.status == 200 and resp.json()["run"], resp
    launch = resp.json()["run"]
    beat = api.post("/api/worker/heartbeat", {"runs": [{"run_id": launch["run_id"],
                                                          "claim_secret": launch["claim_secret"]}]})
    assert beat.status == 200 and beat.json()["gone"] == [], beat
    return launch


def report_finished(api, launch, exit_code=0):
    """Report a claimed run's end as its worker would."""
    resp = api.post("/api/workflows/%d/finished" % launch["workflow_id"], {
        "run_id": launch["run_id"], "claim_secret": launch["claim_secret"], "exit_code": exit_code})
    assert resp.status == 200, resp


def pytest_configure(config):
    config.addinivalue_line("markers", "stand(**settings): configuration settings for the `stand` fixture's server")


@pytest.fixture
def stand(tmp_path, request):
    """A server with a short lease and a factory for workers, all stopped at the end.
    `@pytest.mark.stand(setting=value)` adds configuration settings."""
    marker = request.node.get_closest_marker("stand")
    settings = dict(lease_seconds=2, **(marker.kwargs if marker else {}))
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, **settings)).start()
    workers = []

    def worker(**kw):
        w = WorkerProcess(srv, tmp_path, name="worker%d" % len(workers), **kw).start()
        workers.append(w)
        return w

    srv.worker = worker
    try:
        yield srv
        for w in workers:
            w.stop()
            wait_for(lambda: not processes_with_marker(w.marker), timeout=15, message="worker's processes to exit")
    finally:
        for w in workers:
            w.stop(signal.SIGKILL)
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket, as curl --unix-socket does: Host is localhost."""

    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class UnixClient(Client):
    """A Client on the server's Unix socket (--unix-socket). It sends no token unless asked (token=True)."""

    def __init__(self, path, token=None):
        self.path = path
        self.token = token
        self.conn = UnixHTTPConnection(path)

    def request(self, method, path, body=None, headers=None, token=False):
        return super().request(method, path, body=body, headers=headers, token=token)

    def reconnect(self):
        self.conn.close()
        self.conn = UnixHTTPConnection(self.path, timeout=self.conn.timeout)


# ==== Stand-ins that speak HTTP by hand (a squatter on our port, a proxy, a forwarder) ====

def serve_connections(listener, handle):
    """Accept on `listener` until it is closed, each connection handed to `handle` in a thread of its own."""
    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


def read_request(conn):
    """One request off `conn`, as a stand-in needs it: (request line, {header: value} as sent, body), or
    None if the peer closes before its head ends. The body is Content-Length bytes (no chunked bodies)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines[0], headers, body


class PostReceiver:
    """An HTTP server on loopback for what is posted to it (webhooks, Nextflow's weblog). A subclass
    defines `answer(path, headers, body)`: it keeps what it needs and returns the status to reply with."""

    def __init__(self):
        answer = self.answer

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(answer(self.path, self.headers, body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

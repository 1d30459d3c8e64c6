"""The first start on a login node: `make test` sets itself up, a busy port or a shared data folder
changes nothing and says so in one line, and `make run` starts and stops in order."""

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid

import pytest

from conftest import (CONFIG, FAKE_NEXTFLOW, PYTHON, ROOT, ServerProcess, processes_with_marker, ready_workflow,
                      wait_for, write_config)

NFAPI = os.path.join(ROOT, "nfapi.py")
pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="needs make")


def start_nfapi(tmp_path, *args):
    """nfapi.py run to its end with `args`: (exit status, its output)."""
    proc = subprocess.run([PYTHON, NFAPI, "--config", CONFIG] + list(args), cwd=str(tmp_path), env=clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    return proc.returncode, proc.stdout.decode()


def clean_env(**extra):
    """Our environment without a token, knobs for the stand-in or an outer make's jobserver."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NFAPI_TOKEN", "MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("FAKE_NF_")}
    env.update(extra)
    return env


def make(target, *variables, env=None, cwd=ROOT, **popen):
    """`make <target>` in `cwd` with our Python, started as a terminal starts a foreground job: in its
    own process group (a test sends Ctrl-C to the group) with SIGINT at its default, even when this
    test run was itself started with SIGINT ignored (`.ci/run &`)."""
    return subprocess.Popen(["make", "-s", "--no-print-directory", target, "PYTHON=" + PYTHON] + list(variables),
                            cwd=cwd, env=env or clean_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def listener():
    """A program that holds a port: it must never see a connection."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def received_nothing(sock):
    return select.select([sock], [], [], 0.2)[0] == []


def one_line(output):
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


# ==== make test builds its own environment ====

def test_make_venv_builds_once_and_again_when_the_requirements_change(tmp_path):
    # A copy of the Makefile with a requirements file that installs nothing, so this stays fast.
    shutil.copy(os.path.join(ROOT, "Makefile"), str(tmp_path))
    (tmp_path / "tests").mkdir()
    requirements = tmp_path / "tests" / "requirements.txt"
    requirements.write_text("# nothing\n")
    venv = tmp_path / "venv"

    def build():
        proc = make("venv", "VENV=" + str(venv), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, out
        return "building" in out

    assert build() and (venv / "bin" / "python").exists()
    assert not build()  # up to date: nothing done
    requirements.write_text("# nothing, said differently\n")
    assert build()
    assert not build()


# ==== A busy port ====

def test_busy_port_exits_in_one_line_before_touching_the_data_folder(tmp_path):
    sock = listener()
    port = sock.getsockname()[1]
    status, output = start_nfapi(tmp_path, "--data", str(tmp_path / "data"), "--port", str(port))
    assert status == 1
    assert one_line(output) == "nfapi: port %d on 127.0.0.1 is in use; choose another with --port" % port
    assert not (tmp_path / "data").exists()
    assert received_nothing(sock)


def test_make_run_on_a_busy_port_sends_nothing_to_its_owner(tmp_path):
    sock = listener()
    port = sock.getsockname()[1]
    data = tmp_path / "data"
    data.mkdir()
    # A server.json left by a server that was killed names this port: it must not be trusted.
    stale = json.dumps({"url": "http://127.0.0.1:%d" % port, "host": "127.0.0.1", "port": port, "pid": os.getpid()})
    (data / "server.json").write_text(stale)
    proc = make("run", "PORT=%d" % port, "DATA=" + str(data), "NEXTFLOW=" + FAKE_NEXTFLOW,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = proc.communicate(timeout=30)[0].decode()
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    assert "nfapi: port %d on 127.0.0.1 is in use; choose another with --port" % port in output
    assert "Traceback" not in output and "nfapi-worker" not in output
    assert received_nothing(sock)
    assert sorted(os.listdir(str(data))) == ["server.json"] and (data / "server.json").read_text() == stale


def test_server_json_names_the_running_server_and_goes_with_it(tmp_path):
    srv = ServerProcess(tmp_path).start()
    path = os.path.join(srv.data, "server.json")
    try:
        with open(path) as f:
            info = json.load(f)
        assert info == {"url": srv.url, "host": "127.0.0.1", "port": srv.port, "pid": srv.proc.pid}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.stop()
    assert srv.proc.returncode == 0 and not os.path.exists(path)


# ==== One data folder, one server ====

def test_second_server_on_a_data_folder_exits_and_leaves_the_first_ones_upload_alone(tmp_path):
    first = ServerProcess(tmp_path).start()
    try:
        wid = first.client().create()
        # An upload in progress: its temp file sits in tmp/, which a starting server empties.
        content = b"x" * 100000
        head = ("POST /api/workflows/%d/upload-file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n")
        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n' + content
                + b"\r\n--b--\r\n")
        with socket.create_connection(("127.0.0.1", first.port), timeout=10) as upload:
            upload.sendall((head % (wid, first.token, len(body))).encode() + body[:50000])
            wait_for(lambda: os.listdir(os.path.join(first.data, "tmp")), message="the upload's temp file")
            status, output = start_nfapi(tmp_path, "--data", first.data, "--port", "0")
            assert status == 1
            assert one_line(output) == ("nfapi: %s is in use by another nfapi server (pid %d); stop that one or "
                                        "choose another --data" % (first.data, first.proc.pid))
            upload.sendall(body[50000:])
            assert upload.recv(100).startswith(b"HTTP/1.1 200 ")
        with open(os.path.join(first.data, "workflows", str(wid), "big.bin"), "rb") as f:
            assert f.read() == content
    finally:
        first.stop()
    assert "Traceback" not in first.output()


def test_a_folder_that_is_not_an_nfapi_data_folder_is_refused_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(str(home), 0o755)
    (home / "notes.txt").write_text("mine")
    status, output = start_nfapi(tmp_path, "--data", str(home), "--port", "0")
    assert status == 1
    assert one_line(output) == ("nfapi: %s is not empty and is not an nfapi data folder (it has no nfapi.sqlite3); "
                                "choose a new or empty folder with --data" % home)
    assert stat.S_IMODE(os.stat(str(home)).st_mode) == 0o755 and os.listdir(str(home)) == ["notes.txt"]


def test_an_empty_folder_and_an_nfapi_data_folder_are_adopted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):  # the second start finds the folder the first one made
        srv = ServerProcess(tmp_path, args=["--data", str(empty)]).start()
        srv.stop()
        assert srv.proc.returncode == 0, srv.output()
    assert os.path.exists(str(empty / "nfapi.sqlite3"))


def test_an_unusable_data_path_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    paths = [str(tmp_path / "a-file" / "data"), str(tmp_path / "a-file"), "/sys/nfapi-data"]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        paths.append(str(locked / "data"))
    for path in paths:
        status, output = start_nfapi(tmp_path, "--data", path, "--port", "0")
        assert status == 1, output
        assert one_line(output).startswith("nfapi: cannot use %s as the data folder: " % path)


# ==== Stopping `make run` ====

@pytest.fixture
def make_run(tmp_path):
    """start(nextflow, **env): `make run` on a free port with the stand-in; returns (make, client) once
    its worker serves. Whatever still runs at the end is killed."""
    started = []

    def start(nextflow=FAKE_NEXTFLOW, **env):
        marker = uuid.uuid4().hex
        with open(str(tmp_path / "make.log"), "wb") as log:
            proc = make("run", "PORT=0", "DATA=" + str(tmp_path / "data"), "CONFIG=" + write_config(tmp_path),
                        "NEXTFLOW=" + nextflow, env=clean_env(NFAPI_TEST_MARKER=marker, **env),
                        stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, marker))
        srv = ServerProcess(tmp_path)  # for its client: the same data folder, so the same token
        srv.port = wait_for(lambda: server_info(srv.data), timeout=20, message="make run's server.json")["port"]
        wait_for(lambda: "nfapi-worker: serving" in output(tmp_path), message="the worker")
        proc.marker = marker
        return proc, srv.client()

    yield start
    for proc, marker in started:
        kill_group(proc)
        for pid in processes_with_marker(marker):
            os.kill(pid, signal.SIGKILL)


def kill_group(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def server_info(data):
    try:
        with open(os.path.join(data, "server.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def output(tmp_path):
    with open(str(tmp_path / "make.log"), encoding="latin-1") as f:
        return f.read()


def test_ctrl_c_of_make_run_cancels_the_run_then_stops_both(tmp_path, make_run):
    proc, api = make_run(FAKE_NF_TASK_SECONDS="60")
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["submitted_processes"] == 1,
             timeout=20, message="a task to run")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its whole foreground group
    proc.wait(60)
    log = output(tmp_path)
    assert not processes_with_marker(proc.marker), log
    assert "Traceback" not in log and "heartbeat failed" not in log, log
    assert not os.path.exists(str(tmp_path / "data" / "server.json"))
    srv = ServerProcess(tmp_path).start()  # the same data folder: what did the run end as?
    try:
        run = srv.client().get("/api/workflows/%d" % wid).json()["workflow"]["run"]
    finally:
        srv.stop()
    assert run["status"] == "cancelled", (run, log)


def test_a_second_ctrl_c_stops_make_run_at_once(tmp_path, make_run):
    # A nextflow that ignores SIGTERM: the worker would wait its whole --grace (30 s) for it.
    stubborn = tmp_path / "stubborn-nextflow"
    stubborn.write_text("#!/bin/sh\n[ \"$1\" = -version ] && { echo '      version 24.10.0 build 5928'; exit 0; }\n"
                        "trap '' TERM\nsleep 120\n")
    stubborn.chmod(0o755)
    proc, api = make_run(nextflow=str(stubborn))
    wid = ready_workflow(api)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    wait_for(lambda: "run 1: started" in output(tmp_path), timeout=20, message="nextflow to start")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: "cancelling" in output(tmp_path), message="the worker to start cancelling")
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(20)
    assert time.monotonic() - started < 10  # not the 30 s grace

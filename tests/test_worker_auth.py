"""The worker's credential (H11 hole 1): its requests carry an HMAC made with the API token, never the
token; a request is taken once and only near its time; and the worker uses no answer the server did
not sign, so whoever holds the server's port (or sits between) can neither learn the token nor
command the worker."""

import hashlib
import hmac
import http.client
import json
import os
import socket
import time
import types

import nfapi_worker
from conftest import (ServerProcess, WorkerProcess, read_request, ready_workflow, serve_connections, wait_final,
                      write_config)


def sign(token, method, path, body, nonce=None, when=None):
    """The headers of a worker request, made as README describes them (independently of the worker)."""
    nonce = nonce or os.urandom(16).hex()
    when = str(int(time.time()) if when is None else when)
    body_hash = hashlib.sha256(body).hexdigest()
    mac = hmac.new(token.encode(), "\n".join((method, path, nonce, when, body_hash)).encode(), "sha256").hexdigest()
    return nonce, {"Authorization": "Nfapi-HMAC nonce=%s, time=%s, mac=%s" % (nonce, when, mac),
                   "X-Nfapi-Body-SHA256": body_hash, "Content-Type": "application/json"}


def send(server, method, path, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Nfapi-Proof"), resp.read()
    finally:
        conn.close()


def proof(token, nonce, status, data):
    return hmac.new(token.encode(), ("answer\n%s\n%d\n%s" % (nonce, status, hashlib.sha256(data).hexdigest())).encode(),
                    "sha256").hexdigest()


def test_a_worker_request_is_taken_once_near_its_time_with_its_own_body_and_its_answer_is_signed(tmp_path):
    server = ServerProcess(tmp_path).start()
    try:
        token, path = server.token, "/api/worker/claim"
        body = json.dumps({"worker": "w", "wait": 0}).encode()
        nonce, headers = sign(token, "POST", path, body)
        status, signed, answer = send(server, "POST", path, body, headers)
        assert status == 200 and signed == proof(token, nonce, 200, answer), (status, answer)
        assert send(server, "POST", path, body, headers)[0] == 401  # replayed: the same nonce
        _, headers = sign(token, "POST", path, body, when=time.time() - 600)
        assert send(server, "POST", path, body, headers)[0] == 401  # 10 minutes old
        _, headers = sign(token, "POST", path, body, when=time.time() + 600)
        assert send(server, "POST", path, body, headers)[0] == 401  # 10 minutes ahead
        _, headers = sign(token, "POST", path, body)
        other = json.dumps({"worker": "someone else", "wait": 0}).encode()
        assert send(server, "POST", path, other, headers)[0] == 401  # not the body that was signed
        _, headers = sign("not-the-token", "POST", path, body)
        assert send(server, "POST", path, body, headers)[0] == 401
        nonce, headers = sign(token, "GET", "/api/worker/check", b"")
        status, signed, answer = send(server, "GET", "/api/worker/check", None, headers)
        assert status == 200 and signed == proof(token, nonce, 200, answer)
        # People keep their Bearer token, and their answers carry no proof.
        resp = server.client().get("/api/workers")
        assert resp.status == 200 and resp.headers.get("X-Nfapi-Proof") is None
    finally:
        server.stop()


class TamperingProxy:
    """Between the worker and the server: it passes everything on, except that it rewrites the first
    launch a claim answers with (its config_file becomes `victim`), keeping the server's proof."""

    def __init__(self, server, victim):
        self.server, self.victim = server, victim
        self.tampered = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        serve_connections(self.sock, self.forward)

    def forward(self, conn):
        with conn:
            request = read_request(conn)
            if request is None:
                return
            line, headers, body = request
            method, path = line.split()[:2]
            upstream = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            upstream.request(method, path, body=body or None, headers=headers)
            resp = upstream.getresponse()
            answer, proof_header = resp.read(), resp.getheader("X-Nfapi-Proof", "")
            upstream.close()
            if path == "/api/worker/claim" and not self.tampered and json.loads(answer).get("run"):
                launch = json.loads(answer)
                launch["run"]["config_file"] = str(self.victim)
                answer, self.tampered = json.dumps(launch).encode(), 1
            conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"X-Nfapi-Proof: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (resp.status, proof_header.encode(), len(answer), answer))

    def close(self):
        self.sock.close()


def test_the_worker_uses_no_answer_the_server_did_not_sign(tmp_path):
    """A launch changed on its way (here its config file, to ~/.bashrc's stand-in) is not used: the
    worker logs that what answered may not be the server, claims again, and runs the run the server
    hands it again once the unconfirmed claim went back to the queue."""
    server = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2, claim_confirm_seconds=1)).start()
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    proxy = TamperingProxy(server, victim)
    worker = None
    try:
        api = server.client()
        wid = ready_workflow(api)
        assert api.post("/api/workflows/%d/schedule" % wid).status == 200
        worker = WorkerProcess(types.SimpleNamespace(url=proxy.url, token=server.token), tmp_path).start()
        status = wait_final(api, wid)["status"]
        assert proxy.tampered and not victim.exists(), "the worker used a launch the server did not sign"
        assert "NOT the nfapi server" in worker.output()
        assert status == "succeeded"  # the launch the server signed
    finally:
        if worker:
            worker.stop()
        proxy.close()
        server.stop()


def test_the_worker_refuses_a_launch_with_a_relative_or_unnormalised_path_or_another_command():
    """Should an answer ever pass as the server's, the worker still writes and starts only at
    absolute, normalised paths, and runs nothing but `nextflow run`."""
    good = {"run_id": 1, "workflow_id": 1, "argv": ["run", "/d/main.nf"], "cwd": "/d/launch/1", "params": {},
            "params_file": "/d/runs/1/params.json", "run_dir": "/d/runs/1", "config_file": "/d/runs/1/nfapi.config",
            "config": "", "config_url_token": "", "console_log": "/d/runs/1/console.log", "claim_secret": "s",
            "claim_confirm_seconds": 10}
    assert nfapi_worker.launch_problem(good) is None
    for key, value in [("config_file", "/d/runs/1/../../../home/u/.bashrc"), ("cwd", "launch/1"),
                       ("console_log", "/d/runs/1/./console.log"), ("run_dir", "/d/runs/1/"),
                       ("argv", ["self-update"]), ("argv", [])]:
        assert nfapi_worker.launch_problem(dict(good, **{key: value})), (key, value)

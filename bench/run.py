#!/usr/bin/env python3
"""nfapi benchmarks: `make bench`. Prints one markdown table.

Every figure is compared with a baseline measured in the same run on the same machine, because
these machines are noisy: a bare standard-library http.server handler for the weblog, `cp` of the
same file on the same disk for uploads and downloads. Goals are the ones in issues 6 and 11. The
weblog is also compared with a peer: the seed's stack (Flask under gunicorn, bench/flask_peer.py)
doing the same SQLite work, installed into bench/.venv from bench/requirements.txt.

`python3 bench/run.py weblog` (or listing, processes, launch, transfer) runs only those rows.
"""

import contextlib
import fcntl
import hashlib
import http.client
import http.server
import json
import multiprocessing
import os
import pathlib
import platform
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import write_config  # noqa: E402  (the test suite's helper)

TOKEN = "bench-token"
# A genuine process_completed post (see its SOURCES.md); only its task_id changes from post to post.
SAMPLE = os.path.join(ROOT, "tests", "data", "weblog-samples", "nfweblog-process_completed.json")
GIB = 1 << 30
ROUNDS = 5  # of each transfer and each weblog measure
SEQUENTIAL_EVENTS = 1000  # from the one sender, in each round
EVENTS_PER_RUN = 2500  # each of the 16 concurrent senders, over all rounds: long enough to average out this VM's swings
VENV = os.path.join(BENCH, ".venv")
REQUIREMENTS = os.path.join(BENCH, "requirements.txt")
PEER = "Flask + gunicorn, 2 workers x 8 gthreads, same SQLite work"
ROWS = []


def row(name, value, baseline, ratio, goal, ok):
    """One line of the table; ok is None for a figure shown for reference, without a goal."""
    ROWS.append((name, value, baseline, ratio, goal, "-" if ok is None else "yes" if ok else "**no**"))


# ==== Processes ====

class Server:
    def __init__(self, tmp, config, data=None):
        self.data = data or os.path.join(tmp, "data")
        self.log = open(os.path.join(tmp, "server.log"), "ab")
        env = dict(os.environ, NFAPI_TOKEN=TOKEN)
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "nfapi.py"), "--config", config, "--data",
                                      self.data, "--port", "0", "--quiet"], stdout=subprocess.PIPE,
                                     stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode()
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()

    def hwm_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def call(self, method, path, body=None):
        c = self.conn()
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Authorization": "Bearer " + TOKEN})
        resp = c.getresponse()
        data = resp.read()
        c.close()
        return resp.status, json.loads(data) if data else None


class BareHandler(http.server.BaseHTTPRequestHandler):
    """The baseline: standard library, keep-alive, reads the body, answers 200 with no work."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def bare_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BareHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Peer:
    """The seed's stack: bench/flask_peer.py under gunicorn (2 workers x 8 gthreads), on a database
    of its own that nfapi made, with 17 runs claimed through nfapi: their weblog URLs are nfapi's."""

    def __init__(self, tmp, config):
        data = os.path.join(tmp, "peer-data")
        maker = Server(tmp, config, data)
        try:
            self.runs = claimed_runs(maker, 17, tmp)
        finally:
            maker.stop()
        self.db = os.path.join(data, "nfapi.sqlite3")
        # gunicorn serves a socket that already listens: its port is known before gunicorn starts.
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.log = open(os.path.join(tmp, "peer.log"), "ab")
        # --no-control-socket: else gunicorn opens ~/.gunicorn/gunicorn.ctl, one path for every run.
        self.proc = subprocess.Popen([peer_python(), "-m", "gunicorn", "-w", "2", "--threads", "8", "-k", "gthread",
                                      "-b", "fd://%d" % listener.fileno(), "--no-control-socket", "--chdir", BENCH,
                                      "flask_peer:app"],
                                     stdout=self.log, stderr=self.log, pass_fds=[listener.fileno()],
                                     env=dict(os.environ, NFAPI_PEER_DB=self.db))
        listener.close()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", "/")  # answered (404) once a worker has started
        c.getresponse().read()
        c.close()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()

    def completed(self, workflow_ids):
        conn = sqlite3.connect(self.db)
        counts = [conn.execute("SELECT completed FROM runs WHERE workflow_id = ?", (wid,)).fetchone()[0]
                  for wid in workflow_ids]
        conn.close()
        return counts


def peer_python():
    """bench/.venv's Python, made anew when it is missing or bench/requirements.txt has changed:
    the peer's packages are for this benchmark only, never a dependency of nfapi."""
    python = os.path.join(VENV, "bin", "python")
    wanted = pathlib.Path(REQUIREMENTS).read_text()
    installed = pathlib.Path(VENV, "requirements.txt")
    if not (os.path.exists(python) and installed.exists() and installed.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "-r", REQUIREMENTS], check=True)
        installed.write_text(wanted)
    return python


# ==== Weblog ====

def claimed_runs(server, count, tmp):
    """`count` workflows scheduled and claimed (as a worker would), so their weblog URLs exist."""
    targets = []
    for i in range(count):
        _, answer = server.call("POST", "/api/workflows/create", {"name": "bench %d" % i})
        wid = answer["workflow"]["id"]
        root = os.path.join(server.data, "workflows", str(wid))
        for name in ("ref.fa", "reads/a.fastq"):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            open(os.path.join(root, name), "w").close()
        server.call("POST", "/api/workflows/%d/update" % wid, {"nextflow_workflow": "Hello World (Local)",
                    "nextflow_arguments": {"reference": "ref.fa", "extra_files": ["ref.fa"], "reads": "reads/*.fastq"}})
        status, _ = server.call("POST", "/api/workflows/%d/schedule" % wid)
        assert status == 200
        _, claim = server.call("POST", "/api/worker/claim", {"worker": "bench", "wait": 0})
        # The weblog URL with the secret in its query, as Nextflow before 23.10 posts it.
        url = re.search(r"url = '([^']*)'", claim["run"]["config_url_token"]).group(1)
        targets.append((wid, urllib.parse.urlsplit(url)))
    return targets


def send_events(port, target, first_task, count, latencies):
    """Post `count` process_completed events one at a time on one keep-alive connection, each
    waiting for its answer, as Nextflow does.

    The client is a minimal HTTP/1.1 one on a raw socket: http.client parses every answer's headers
    with the email package, which cost more CPU per event than the server under test, and the
    senders share the server's two cores.
    """
    with open(SAMPLE) as f:
        template = json.load(f)
    path = target.path + ("?" + target.query if target.query else "")
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: Nextflow/24.10.0\r\n"
            "Content-Type: application/json\r\nContent-Length: %%d\r\n\r\n" % (path, port)).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    for task in range(first_task, first_task + count):
        template["trace"]["task_id"] = task
        body = json.dumps(template, separators=(",", ":")).encode()
        start = time.perf_counter()
        sock.sendall(head % len(body) + body)
        answer, pending = read_answer(sock, pending)
        latencies.append(time.perf_counter() - start)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    sock.close()


def read_answer(sock, data):
    """One answer (head and Content-Length body) from a keep-alive socket, and the bytes after it."""
    head, length, rest = read_answer_head(sock, data)
    while len(rest) < length:
        rest += sock.recv(65536) or eof()
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def read_answer_head(sock, data):
    """An answer's head, its Content-Length, and the bytes received after the head."""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or eof()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, int(re.search(rb"\r\nContent-Length: *([0-9]+)", head, re.I).group(1)), rest


def eof():
    raise ConnectionError("the server closed the connection")


def run_senders(port, targets, first_task, per_sender):
    latencies = []
    threads = [threading.Thread(target=send_events, args=(port, target, first_task, per_sender, latencies))
               for target in targets]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(targets) * per_sender / (time.perf_counter() - start), latencies


def bench_weblog(tmp, config):
    """nfapi, the bare baseline and the peer in turn, ROUNDS times; the median rate of each counts.
    Each round posts new task ids, so every post is an insert, as a process_completed event is."""
    with contextlib.ExitStack() as stack:
        server = Server(tmp, config)
        stack.callback(server.stop)
        peer = Peer(tmp, config)
        stack.callback(peer.stop)
        bare = bare_server()
        stack.callback(bare.shutdown)
        runs = claimed_runs(server, 17, tmp)
        bare_url = urllib.parse.urlsplit("http://127.0.0.1/bare")
        stacks = {"bare": (bare.server_address[1], [bare_url] * 17),  # name: port, 1 + 16 senders' URLs
                  "nfapi": (server.port, [url for _, url in runs]),
                  "peer": (peer.port, [url for _, url in peer.runs])}
        for port, urls in stacks.values():
            run_senders(port, urls[:1], 1, 200)  # warm-up
        one = in_turns(stacks, lambda port, urls, turn: run_senders(
            port, urls[:1], 1000 + turn * SEQUENTIAL_EVENTS, SEQUENTIAL_EVENTS))
        per_round = EVENTS_PER_RUN // ROUNDS
        many = in_turns(stacks, lambda port, urls, turn: run_sender_processes(
            port, urls[1:17], 1 + turn * per_round, per_round))
        counted = [server.call("GET", "/api/workflows/%d" % wid)[1]["workflow"]["completed_processes"]
                   for wid, _ in runs[1:17]]
        peer_counted = peer.completed([wid for wid, _ in peer.runs[1:17]])
    rate = {name: statistics.median(r for r, _ in results) for name, results in one.items()}
    latency = {name: [t for _, times in results for t in times] for name, results in one.items()}
    p50, p99 = percentile(latency["nfapi"], 50), percentile(latency["nfapi"], 99)
    row("Weblog, 1 sender (events/s)", "%.0f (p50 %.2f ms, p99 %.2f ms)" % (rate["nfapi"], p50, p99),
        "%.0f (bare http.server, p50 %.2f ms)" % (rate["bare"], percentile(latency["bare"], 50)),
        "%.2f" % (rate["nfapi"] / rate["bare"]), ">= 2000/s and >= 0.5",
        rate["nfapi"] >= 2000 and rate["nfapi"] / rate["bare"] >= 0.5)
    row("Weblog, 1 sender, against the seed's stack (events/s)", "%.0f" % rate["nfapi"],
        "%.0f (%s, p50 %.2f ms)" % (rate["peer"], PEER, percentile(latency["peer"], 50)),
        "%.2f" % (rate["nfapi"] / rate["peer"]), ">= 2.5 of the peer", rate["nfapi"] / rate["peer"] >= 2.5)
    rate16 = {name: statistics.median(results) for name, results in many.items()}
    all_counted = "all %d counted" % (16 * EVENTS_PER_RUN)
    ok_counts = counted == [EVENTS_PER_RUN] * 16
    row("Weblog, 16 sender processes (events/s)",
        "%.0f; counts %s" % (rate16["nfapi"], all_counted if ok_counts else counted),
        "%.0f (bare http.server)" % rate16["bare"], "%.2f" % (rate16["nfapi"] / rate16["bare"]),
        ">= 4000/s, nothing lost", rate16["nfapi"] >= 4000 and ok_counts)
    row("Weblog, 16 sender processes, against the seed's stack (events/s)", "%.0f" % rate16["nfapi"],
        "%.0f (%s); counts %s" % (rate16["peer"], PEER,
                                  all_counted if peer_counted == [EVENTS_PER_RUN] * 16 else peer_counted),
        "%.2f" % (rate16["nfapi"] / rate16["peer"]), "(reference: the goal is on 1 sender)", None)


def in_turns(stacks, measure):
    """measure(port, urls, turn) of each stack ROUNDS times, each round in a different order: none
    always follows the same one. The results of each stack, by name."""
    names = list(stacks)
    results = {name: [] for name in names}
    for turn in range(ROUNDS):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            results[name].append(measure(*stacks[name], turn))
    return results


def run_sender_processes(port, targets, first_task, per_sender):
    """Like run_senders, but each sender is its own process, as 16 runs are 16 nextflow JVMs (16
    threads of one Python client would share its GIL and measure the client instead)."""
    ctx = multiprocessing.get_context("fork")
    start_line = ctx.Barrier(len(targets) + 1)
    procs = [ctx.Process(target=sender_process, args=(port, target, first_task, per_sender, start_line))
             for target in targets]
    for p in procs:
        p.start()
    start_line.wait()
    start = time.perf_counter()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    return len(targets) * per_sender / (time.perf_counter() - start)


def sender_process(port, target, first_task, count, start_line):
    start_line.wait()
    send_events(port, target, first_task, count, [])


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000


# ==== Upload and download ====

def make_file(path, size):
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size >> 20):
            chunk = bytes([i % 256]) + block[1:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def timed(action, read, written=None, durable=False):
    """Seconds for action(), and for syncing the file it wrote when `durable`.

    Untimed before: dirty pages are written out and the file it reads is read once, so that it
    comes from the page cache (this VM's cache is small: each 1 GiB copy evicts the last one, and
    a cold read measures the virtual disk). Untimed after: the file it wrote is removed.
    """
    subprocess.run(["sync"])
    with open(read, "rb") as f:
        while f.read(1 << 20):
            pass
    start = time.perf_counter()
    action()
    if durable:
        subprocess.run(["sync", written])
    elapsed = time.perf_counter() - start
    if written:
        os.unlink(written)
    return elapsed


def upload(port, wid, src, name):
    """A multipart upload whose file part goes out with sendfile: the client costs next to nothing."""
    boundary = "benchboundary"
    head = ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n' % (boundary, name)).encode()
    tail = ("\r\n--%s--\r\n" % boundary).encode()
    size = os.path.getsize(src)
    with socket.create_connection(("127.0.0.1", port)) as sock, open(src, "rb") as f:
        sock.sendall(("POST /api/workflows/%d/upload-file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                      "Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
                      % (wid, TOKEN, boundary, len(head) + size + len(tail))).encode() + head)
        sock.sendfile(f)
        sock.sendall(tail)
        answer, _ = read_answer(sock, b"")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def download(port, path, out):
    """A GET written to `out` the way cp copies: inside the kernel (splice), as a best-case client.
    curl, which copies through 16 KiB buffers, has its own row."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % (path, TOKEN)).encode())
        head, length, data = read_answer_head(sock, b"")
        assert head.startswith(b"HTTP/1.1 200 "), head
        left = length - len(data)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pipe_out, pipe_in = os.pipe()
        fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            os.write(fd, data)
            while left:  # socket to pipe to file, inside the kernel (os.splice, Python 3.10+)
                n = os.splice(sock.fileno(), pipe_in, min(left, 1 << 20)) or eof()
                left -= n
                while n:
                    n -= os.splice(pipe_out, fd, n)
        finally:
            os.close(fd)
            os.close(pipe_out)
            os.close(pipe_in)


def bench_transfer(tmp, config):
    """Each transfer ROUNDS times, interleaved with its baselines; the median time of each counts."""
    src = os.path.join(tmp, "big.bin")
    digest = make_file(src, GIB)
    out = os.path.join(tmp, "copy.bin")
    server = Server(tmp, config)
    try:
        _, answer = server.call("POST", "/api/workflows/create", {"name": "transfer"})
        wid = answer["workflow"]["id"]
        folder = os.path.join(server.data, "workflows", str(wid))
        served = os.path.join(folder, "served.bin")
        shutil.copyfile(src, served)
        path = "/api/workflows/%d/download?path=served.bin" % wid
        url = "http://127.0.0.1:%d%s" % (server.port, path)
        before = server.hwm_kb()
        transfers = [  # name, the file it reads, the file it writes, how, timed until on disk
            ("cp", src, out, lambda: subprocess.run(["cp", src, out], check=True), True),
            # The server fsyncs an upload before it answers.
            ("upload", src, os.path.join(folder, "big.bin"), lambda: upload(server.port, wid, src, "big.bin"), False),
            ("download", served, out, lambda: download(server.port, path, out), True),
            ("curl", served, out, lambda: curl(url, out), True),
            ("curl file", src, out, lambda: curl("file://" + src, out), True),
            ("curl null", served, None, lambda: curl(url, os.devnull), False),
        ]
        times = {name: [] for name, _, _, _, _ in transfers}
        for turn in range(ROUNDS):  # each round in a different order: none always follows the same one
            for name, read, written, action, durable in transfers[turn:] + transfers[:turn]:
                times[name].append(timed(action, read, written, durable))
        growth = (server.hwm_kb() - before) / 1024
        upload(server.port, wid, src, "checked.bin")
        uploaded_ok = file_digest(os.path.join(folder, "checked.bin")) == digest
        download(server.port, path, out)
        downloaded_ok = file_digest(out) == digest
        os.unlink(out)
    finally:
        server.stop()
        os.unlink(src)
    # Writing a fresh GiB into this VM's page cache takes 0.3 s one time and 1.8 s the next (cp
    # and cat alike): the median of interleaved runs is the fairest figure it allows.
    middle = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: GIB / seconds / 1e6 for name, seconds in middle.items()}
    cp = "%.0f (cp, then sync)" % rate["cp"]
    ratio = {name: middle["cp"] / middle[name] for name in middle}
    row("Upload 1 GiB, multipart, until on disk (MB/s)", "%.0f; SHA-256 %s; memory +%.1f MB" % (
        rate["upload"], "matches" if uploaded_ok else "DIFFERS", growth), cp, "%.2f" % ratio["upload"],
        ">= 0.5 of cp, memory < 30 MB", uploaded_ok and ratio["upload"] >= 0.5 and growth < 30)
    row("Download 1 GiB to disk (MB/s)", "%.0f; SHA-256 %s" % (rate["download"], "matches" if downloaded_ok else "DIFFERS"),
        cp, "%.2f" % ratio["download"], ">= 0.8 of cp", downloaded_ok and ratio["download"] >= 0.8)
    row("Download 1 GiB with curl, to disk (MB/s)", "%.0f" % rate["curl"],
        "%.0f (curl copying the local file, then sync)" % rate["curl file"], "%.2f" % (middle["curl file"] / middle["curl"]),
        "(reference: curl writes 16 KiB at a time)", None)
    row("Download 1 GiB with curl, to /dev/null (MB/s)", "%.0f" % rate["curl null"], cp, "%.2f" % ratio["curl null"],
        ">= 0.8 of cp", ratio["curl null"] >= 0.8)


def curl(url, out):
    subprocess.run(["curl", "-sS", "-f", "-o", out, "-H", "Authorization: Bearer " + TOKEN, url], check=True)


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ==== Listing ====

def timed_gets(server, path, count):
    """GET `path` `count` times on one keep-alive connection: the median time in ms, and the last answer."""
    c = server.conn()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        c.request("GET", path, headers={"Authorization": "Bearer " + TOKEN})
        resp = c.getresponse()
        data = resp.read()
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, (path, resp.status)
    return statistics.median(times), json.loads(data)


def bench_listing(tmp, config):
    data = os.path.join(tmp, "listing-data")
    server = Server(tmp, config, data)  # creates the schema
    server.stop()
    conn = sqlite3.connect(os.path.join(data, "nfapi.sqlite3"))
    now = time.time()
    with conn:
        conn.executemany("INSERT INTO workflows (name, created_at) VALUES (?, ?)",
                         (("workflow %d" % i, now) for i in range(10000)))
        conn.executemany("INSERT INTO runs (workflow_id, status, pipeline, arguments, secret, created_at, submitted, "
                         "completed) VALUES (?, 'succeeded', 'Hello World (Local)', '{}', 'x', ?, 100, 100)",
                         ((wid, now) for wid in range(1, 10001)))
        conn.executemany("INSERT INTO tasks (run_id, task_id, status, name, process) VALUES (?, ?, 'COMPLETED', 'P', 'P')",
                         ((run, task) for run in range(1, 1001) for task in range(1, 101)))
    conn.close()
    server = Server(tmp, config, data)
    try:
        for path, label in (("/api/workflows?limit=100", "list 100 of 10,000"), ("/api/workflows/count", "count"),
                            ("/api/workflows/5000", "one workflow"),
                            ("/api/workflows/500/runs/500/tasks", "100 tasks of a run (of 100,000)")):
            median, _ = timed_gets(server, path, 200)
            row("Listing: %s (median ms)" % label, "%.2f" % median, "-", "-", "< 20 ms", median < 20)
    finally:
        server.stop()


# ==== Processes view ====

PROCESS_SIZES = {"FASTQC": 50000, "ALIGN": 25000, "COUNT": 15000, "MULTIQC": 10000}  # 100,000 tasks


def bench_processes(tmp, config):
    """GET .../processes of a run of 100,000 tasks. The tasks go in through nfapi's own record_task
    (what a weblog post does), the server stopped, so that filling the database takes seconds."""
    data = os.path.join(tmp, "processes-data")
    server = Server(tmp, config, data)
    try:
        (wid, _), = claimed_runs(server, 1, tmp)
    finally:
        server.stop()
    sys.path.insert(0, ROOT)
    import nfapi  # noqa: E402  (the server under test, as a library)
    db = nfapi.Database(os.path.join(data, "nfapi.sqlite3"))
    app = types.SimpleNamespace(config={"max_tasks_per_run": 10 ** 6})  # all record_task reads of the App
    run = dict(db.writer.execute("SELECT * FROM runs").fetchone())
    values = random.Random(13)
    realtimes = {name: [] for name in PROCESS_SIZES}
    traces = []
    for name, size in PROCESS_SIZES.items():
        for _ in range(size):
            realtimes[name].append(values.randint(1000, 10 ** 7))
            traces.append({"task_id": len(traces) + 1, "status": "COMPLETED", "process": name, "exit": 0,
                           "realtime": realtimes[name][-1], "peak_rss": values.randint(1, 1 << 34), "%cpu": 99.5})
    values.shuffle(traces)  # processes run interleaved
    for start in range(0, len(traces), 10000):
        with db.write() as conn:
            for trace in traces[start:start + 10000]:
                nfapi.record_task(app, conn, run, trace)
    db.close()
    server = Server(tmp, config, data)
    try:
        path = "/api/workflows/%d/runs/%d/processes" % (wid, run["id"])
        median, answer = timed_gets(server, path, 100)
        right = [p["realtime"]["median"] for p in answer["processes"]] == [
            statistics.median(realtimes[p["process"]]) for p in answer["processes"]]
        row("Processes view of a run of 100,000 tasks, 4 processes (median ms)",
            "%.2f; medians %s" % (median, "right" if right else "WRONG"), "-", "-", "< 20 ms", median < 20 and right)
    finally:
        server.stop()


# ==== Launch latency ====

def bench_launch(tmp, config):
    server = Server(tmp, config)
    record = os.path.join(tmp, "record")
    os.makedirs(record)
    env = dict(os.environ, NFAPI_TOKEN=TOKEN, FAKE_NF_RECORD=record, FAKE_NF_TASK_SECONDS="0")
    worker = subprocess.Popen([sys.executable, os.path.join(ROOT, "nfapi_worker.py"), "--server",
                               "http://127.0.0.1:%d" % server.port, "--nextflow",
                               os.path.join(ROOT, "tests", "fake_nextflow.py")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        targets = []
        for i in range(10):
            _, answer = server.call("POST", "/api/workflows/create", {"name": "launch %d" % i})
            wid = answer["workflow"]["id"]
            root = os.path.join(server.data, "workflows", str(wid))
            os.makedirs(os.path.join(root, "reads"))
            for name in ("ref.fa", "reads/a.fastq"):
                open(os.path.join(root, name), "w").close()
            server.call("POST", "/api/workflows/%d/update" % wid, {"nextflow_workflow": "Hello World (Local)",
                        "nextflow_arguments": {"reference": "ref.fa", "extra_files": ["ref.fa"], "reads": "reads/*.fastq"}})
            targets.append(wid)
        time.sleep(1)  # the worker is idle in its long-poll
        latencies = []
        for wid in targets:
            scheduled = time.time()
            server.call("POST", "/api/workflows/%d/schedule" % wid)
            name = None
            deadline = time.time() + 10
            while time.time() < deadline:
                status, answer = server.call("GET", "/api/workflows/%d" % wid)
                run = answer["workflow"]["run"]
                path = os.path.join(record, "nfapi-run-%d.json" % run["id"])
                if os.path.exists(path) and os.path.getsize(path):
                    with open(path) as f:
                        name = json.load(f)
                    if run["status"] in ("succeeded", "failed"):
                        break
                time.sleep(0.01)
            latencies.append(name["started_at"] - scheduled)
        median = statistics.median(latencies)
        row("Launch: schedule to nextflow start (median s)", "%.3f (max %.3f)" % (median, max(latencies)), "-", "-",
            "< 0.5 s", median < 0.5)
    finally:
        worker.terminate()
        worker.wait()
        server.stop()


def main():
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="nfapi-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        config = write_config(pathlib.Path(tmp))
        chosen = sys.argv[1:] or ["weblog", "listing", "processes", "launch", "transfer"]
        for bench in (globals()["bench_" + name] for name in chosen):
            sub = os.path.join(tmp, bench.__name__)
            os.makedirs(sub)
            bench(sub, config)
    print("nfapi benchmarks, %s, Python %s, SQLite %s, %d CPUs, %s (%.0f s)\n" % (
        time.strftime("%Y-%m-%d"), platform.python_version(), sqlite3.sqlite_version, os.cpu_count(),
        platform.platform(), time.time() - started))
    print("| measure | nfapi | baseline (same run) | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        print("| %s |" % " | ".join(r))


if __name__ == "__main__":
    main()

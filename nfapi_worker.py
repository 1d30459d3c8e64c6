#!/usr/bin/env python3
"""nfapi_worker: claim runs from an nfapi server and run `nextflow` for them.

    NFAPI_TOKEN=... python3 nfapi_worker.py --server http://127.0.0.1:8000 [--slots N] [--nextflow PATH]
    python3 nfapi_worker.py --server http://login1:8000 --token-file nfapi-data/api-token
    python3 nfapi_worker.py --check --server http://login1:8000    # is this node ready to run?
    python3 nfapi_worker.py --server unix:nfapi-data/nfapi.sock      # on the server's node, no token

The worker talks to the server over HTTP only (it never opens the database), so it can run on
another node that shares the data folder, and several workers can serve one server. It long-polls
`/api/worker/claim` for queued runs, runs up to --slots at once, heartbeats them every second, and
reports each end to `/api/workflows/<id>/finished` with nextflow's exit code. Each claim comes with a
claim secret that every report about the run shows. A claimed run is confirmed with a heartbeat
before nextflow starts: a claim the server has taken back meanwhile is dropped. A run the server
answers as `gone` (it gave up on it) has its nextflow stopped at once. The token never leaves the
worker: each request carries an HMAC made with it, and an answer is used only with the server's proof
(Api.request), so whatever holds the server's port while nfapi is down learns nothing and commands nothing.

Nextflow gets the launch the server built: the argv after the binary (user values are only in the
params file, where `$` is written `\\u0024` so Nextflow replaces no `${...}` in them), the run's
private config (given with -c: the weblog with its secret, the trace file, report and timeline; the
worker reads `nextflow -version` once at start, and Nextflow before 23.10 gets the form that has the
secret in the weblog URL), its launch folder as cwd, umask 077, and the worker's environment minus
NFAPI_TOKEN, with NXF_VER when the pipeline pins a Nextflow version. Its stdout and stderr go to the
run's console.log. It runs in its own process group and gets SIGTERM if the worker dies (Linux). It holds a lock on its launch folder for as long as it runs,
even past the worker: a launch whose folder is locked is refused, so a workflow never has two
nextflow at once. Cancelling sends SIGTERM (nextflow then kills its tasks and reports them ABORTED),
then SIGKILL to the whole group after --grace seconds. SIGTERM or Ctrl-C on the worker withdraws its
claim poll, stops all its runs that way and reports them before exiting.
"""

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

# ==== Settings ====

HEARTBEAT_SECONDS = 1.0
CLAIM_WAIT_SECONDS = 20
MAX_BACKOFF_SECONDS = 10.0
CONSOLE_TAIL_BYTES = 4000
STOP_REPORT_SECONDS = 60  # how long a stopping worker keeps trying to report a run's end
PR_SET_PDEATHSIG = 1
VERSION_SECONDS = 120  # `nextflow -version` may first download the Nextflow it runs
LAUNCH_LOCK = ".nfapi-launch.lock"
# The only session id the worker puts after -resume: anything else would be an option of its own.
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NEXTFLOW_VERSION = re.compile(r"\bversion ([0-9]+\.[0-9]+\.[0-9]+)")
# A pinned Nextflow version, as nfapi.py accepts one in its configuration: only that goes in NXF_VER.
PINNED_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?")


def log(message, *args):
    sys.stderr.write("nfapi-worker: " + (message % args if args else message) + "\n")
    sys.stderr.flush()


# ==== Server API ====

class Unavailable(Exception):
    """The server could not be reached or gave an answer we cannot use; try again later."""


class Refused(Unavailable):
    """The server refused the request for good (a 4xx answer): asking again cannot change it."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the server's Unix socket (--server unix:PATH), where its owner needs no token."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Unsigned(Unavailable):
    """An answer without the server's proof: the token is wrong, or what answered is not the server."""


class Api:
    def __init__(self, server, token):
        url = urllib.parse.urlsplit(server)
        if url.scheme == "unix":
            self.connection_class, self.address, self.prefix = UnixHTTPConnection, url.path, ""
        else:
            self.connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            self.address = url.netloc
            self.prefix = url.path.rstrip("/")
        self.where = server
        self.token = token  # None on the Unix socket

    def connection(self, timeout=30):
        return self.connection_class(self.address, timeout=timeout)

    def post(self, path, body, timeout=30, connection=None):
        """POST JSON on a new connection (or `connection`) and return the answer (see request)."""
        return self.request("POST", path, json.dumps(body).encode(), timeout, connection)

    def get(self, path, timeout=30):
        return self.request("GET", path, None, timeout)

    def request(self, method, path, data, timeout=30, connection=None):
        """Return the answer, a JSON object ({} for an empty body). The worker can only log and go on,
        so every failure is raised as Unavailable with the server's message; Refused when asking
        again cannot help.

        The token never leaves the worker: whoever holds the server's port while the server is down
        would get it. The request carries an HMAC made with it instead, and the answer must carry
        the server's proof (an HMAC of our nonce, its status and its body), or nothing in it is used."""
        conn = connection or self.connection(timeout)
        nonce = secrets.token_hex(16)
        try:
            # Over the Unix socket the kernel vouches for both ends (a 0700 folder, SO_PEERCRED): no token.
            headers = self.signature(method, path, nonce, data) if self.token else {"Content-Type": "application/json"}
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            proof = resp.getheader("X-Nfapi-Proof", "")
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable("%s: %s" % (path, e))
        finally:
            conn.close()
        said = data[:300].decode("utf-8", "replace")
        if self.token and not hmac.compare_digest(proof.encode("latin-1"),
                                                  self.hmac("answer\n%s\n%d\n%s" % (nonce, resp.status, sha256_hex(data))).encode()):
            raise Unsigned("%s answered %d without the server's proof, so nothing in it was used (%r). Either the "
                           "token is wrong, or the program at %s is NOT the nfapi server: another program may hold "
                           "its port while nfapi is down" % (path, resp.status, said[:120], self.address))
        if resp.status >= 400:
            message = "%s answered %d: %s" % (path, resp.status, said)
            raise (Refused if resp.status < 500 and resp.status not in (408, 429) else Unavailable)(message)
        try:
            answer = json.loads(data) if data.strip() else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Unavailable("%s answered something that is not a JSON object" % path)
        return answer

    def signature(self, method, path, nonce, data):
        """The headers that show the token without sending it (nfapi.py: Request.worker_mac_problem). The
        path is the one the server sees: a proxy that serves it under a prefix takes the prefix off."""
        when, body = str(int(time.time())), sha256_hex(data or b"")
        mac = self.hmac("\n".join((method, path, nonce, when, body)))
        return {"Authorization": "Nfapi-HMAC nonce=%s, time=%s, mac=%s" % (nonce, when, mac),
                "X-Nfapi-Body-SHA256": body, "Content-Type": "application/json"}

    def hmac(self, text):
        return hmac.new(self.token.encode(), text.encode(), "sha256").hexdigest()


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def claim_of(launch):
    """What shows the server that a report about a run comes from the worker holding its claim."""
    return {"run_id": launch["run_id"], "claim_secret": launch["claim_secret"]}


# ==== One run ====

def nextflow_version(binary):
    """The version `binary -version` prints (e.g. "25.04.0"), or None when it cannot be told."""
    try:
        out = subprocess.run([binary, "-version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=child_environment(), timeout=VERSION_SECONDS).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = NEXTFLOW_VERSION.search(out.decode("utf-8", "replace"))
    return found.group(1) if found else None


def sends_basic_token(version):
    """Whether this Nextflow sends weblog.basicToken (nf-weblog 1.1.0 on, Nextflow 23.10 on). An unknown
    version is taken for a current one."""
    return version is None or tuple(int(part) for part in version.split(".")[:2]) >= (23, 10)


def prepare_child():
    """In the child before exec: files nextflow creates are private (before 23.10 .nextflow.log holds
    the weblog URL with its secret), and Linux sends SIGTERM when the thread that started it dies, so a
    worker killed with SIGKILL leaves no nextflow running unseen."""
    os.umask(0o077)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_environment(nextflow_version=None):
    """The worker's environment minus the API token (pipeline tasks must never see it), with NXF_VER
    set to the pipeline's pinned Nextflow version: Nextflow's launcher script runs that version."""
    env = dict(os.environ)
    env.pop("NFAPI_TOKEN", None)
    if nextflow_version:
        env["NXF_VER"] = nextflow_version
    return env


def nextflow_home(env):
    return env.get("NXF_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".nextflow")


def has_framework(env, version):
    """Whether Nextflow's launcher finds `version` without downloading it ($NXF_HOME/framework/<version>)."""
    folder = os.path.join(nextflow_home(env), "framework", version)
    return os.path.isdir(folder) and bool(os.listdir(folder))


def pinned_version_problem(version, env):
    """Why nextflow cannot start with the pinned `version`, or None. The launcher would download a
    version it lacks; offline it fails after a long wait, so the run fails at once and says why."""
    if version is None:
        return None
    if not isinstance(version, str) or not PINNED_VERSION.fullmatch(version):
        return "the server pinned a Nextflow version that is not one (%r); nextflow was not started" % (version,)
    if env.get("NXF_OFFLINE") == "true" and not has_framework(env, version):
        framework = os.path.join(nextflow_home(env), "framework")
        return ("this pipeline is pinned to Nextflow %s, which is not in %s, and NXF_OFFLINE=true forbids downloading "
                "it; nextflow was not started. Fetch it once on a node with internet access and the same NXF_HOME: "
                "NXF_VER=%s nextflow -version" % (version, framework, version))
    return None


def params_file_text(params):
    """The params file: JSON in which `$` is written \\u0024. Nextflow replaces `${name}` in the
    file's text before parsing it, so a value such as `${launchDir}` would not stay what the user typed."""
    return json.dumps(params, indent=2).replace("$", "\\u0024").encode()


def resume_problem(argv):
    """Why the launch's -resume cannot go on nextflow's command line, or None. Nextflow takes the word
    after -resume as the session only when it is a UUID; anything else becomes an option of its own."""
    for i, arg in enumerate(argv):
        session = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "-resume" and not SESSION_ID.fullmatch(session):
            return "the run's -resume session %r is not a Nextflow session id; nextflow was not started" % session
    return None


def lock_launch_folder(folder):
    """A descriptor holding the lock of nextflow's launch folder, or None when another process holds it.

    Nextflow inherits the descriptor (pass_fds), so the lock lasts as long as nextflow does, even
    past this worker: a worker paused or cut off may still have nextflow running there."""
    fd = os.open(os.path.join(folder, LAUNCH_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_private(path, data):
    temp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def keep_nextflow_log(launch):
    """Copy .nextflow.log into the run folder: nextflow rolls it away at the workflow's next run.
    The pipeline writes in the launch folder too: a link or a FIFO there is not followed."""
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(launch["cwd"], ".nextflow.log"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                write_private(os.path.join(launch["run_dir"], "nextflow.log"), f.read())


def console_tail(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - CONSOLE_TAIL_BYTES))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class RunProcess(threading.Thread):
    """Confirm the claim of one run, start nextflow for it, wait for it, and report how it ended."""

    def __init__(self, worker, launch):
        super().__init__(name="run-%d" % launch["run_id"], daemon=True)
        self.worker = worker
        self.launch = launch
        self.run_id = launch["run_id"]
        self.proc = None
        self.stopped_because = None  # "cancel" (a user), "stop" (the worker stops) or "gone" (the server gave up)
        self.lock = threading.Lock()

    def run(self):
        try:
            if not self.worker.confirm(self.launch):
                return
            try:
                exit_code, error = self.execute()
            except OSError as e:
                exit_code, error = None, "the worker could not prepare the run: %s" % e
            if self.proc is None and self.stopped_because == "stop":
                self.worker.release(self.launch)  # nothing ran: another worker can take it
            else:
                self.worker.report_finished(self.launch, exit_code, error, self.stopped_because in ("cancel", "stop"))
        finally:
            self.worker.forget(self)

    def execute(self):
        launch = self.launch
        for folder in (launch["run_dir"], launch["cwd"]):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(launch["console_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "wb") as console:
            problem = resume_problem(launch["argv"]) or pinned_version_problem(launch.get("nextflow_version"),
                                                                               os.environ)
            lock = None if problem else lock_launch_folder(launch["cwd"])
            if lock is None:
                problem = problem or ("another nextflow still runs in this workflow's launch folder %s (a run "
                                      "whose worker lost contact with the server); schedule again once it has "
                                      "stopped" % launch["cwd"])
                console.write((problem + "\n").encode())
                return None, problem
            try:
                return self.run_nextflow(console, lock)
            finally:
                os.close(lock)

    def run_nextflow(self, console, lock):
        launch = self.launch
        write_private(launch["params_file"], params_file_text(launch["params"]))
        # A pinned version is the one that runs (NXF_VER), whatever `nextflow -version` said at start.
        version = launch.get("nextflow_version") or self.worker.nextflow_version
        config = launch["config"] if sends_basic_token(version) else launch["config_url_token"]
        write_private(launch["config_file"], config.encode())
        argv = [self.worker.nextflow] + launch["argv"]
        with self.lock:
            if self.stopped_because:
                return None, "stopped before nextflow started"
            try:
                env = child_environment(launch.get("nextflow_version"))
                self.proc = subprocess.Popen(argv, cwd=launch["cwd"], env=env, stdin=subprocess.DEVNULL,
                                             stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                                             pass_fds=(lock,), preexec_fn=prepare_child)
            except OSError as e:
                message = "cannot start nextflow (%s): %s" % (self.worker.nextflow, e.strerror)
                console.write((message + "\n").encode())
                return None, message
        log("run %d: started %s (pid %d)", self.run_id, self.worker.nextflow, self.proc.pid)
        exit_code = self.proc.wait()
        self.kill_group()  # tasks that outlived nextflow
        keep_nextflow_log(launch)
        log("run %d: nextflow exited with %d", self.run_id, exit_code)
        return exit_code, None if exit_code == 0 else console_tail(launch["console_log"])

    def stop_nextflow(self, because):
        """SIGTERM now (nextflow stops its tasks itself), SIGKILL to the group after the grace period."""
        with self.lock:
            if self.stopped_because:
                return
            self.stopped_because = because
            if self.proc is None or self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        log("run %d: %s (SIGTERM to %d)", self.run_id,
            "the server gave it up; stopping nextflow" if because == "gone" else "cancelling", self.proc.pid)
        timer = threading.Timer(self.worker.grace, self.kill_group)
        timer.daemon = True
        timer.start()

    def kill_group(self):
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


# ==== The worker loop ====

class Worker:
    def __init__(self, api, slots, nextflow, grace, nextflow_version):
        self.api = api
        self.slots = slots
        self.nextflow = nextflow
        self.nextflow_version = nextflow_version
        self.grace = grace
        self.name = "%s:%d" % (socket.gethostname(), os.getpid())
        self.stop = threading.Event()
        self.runs = {}
        self.lock = threading.Lock()
        self.slot_free = threading.Event()
        self.claim_connection = None

    def serve(self):
        """Claim on one thread, heartbeat on another; the main thread only waits for a stop signal."""
        threading.Thread(target=self.heartbeat_forever, name="heartbeat", daemon=True).start()
        claimer = threading.Thread(target=self.claim_forever, name="claim", daemon=True)
        claimer.start()
        self.stop.wait()
        self.withdraw_claim()
        claimer.join(5)  # a run it got just now is released (start)
        self.shutdown()

    def claim_forever(self):
        backoff = 0.1
        while not self.stop.is_set():
            if not self.has_free_slot():
                self.slot_free.wait(1.0)
                self.slot_free.clear()
                continue
            try:
                self.claim_connection = self.api.connection(CLAIM_WAIT_SECONDS + 30)
                claim = {"worker": self.name, "wait": CLAIM_WAIT_SECONDS, "host": socket.gethostname(),
                         "pid": os.getpid(), "slots": self.slots, "nextflow_version": self.nextflow_version}
                launch = self.api.post("/api/worker/claim", claim, connection=self.claim_connection).get("run")
                problem = None if launch is None else launch_problem(launch)
                if problem:  # its text holds secrets (the config, the claim secret): not logged
                    raise Unavailable("the claim answer is not a launch this worker runs: %s" % problem)
            except Unavailable as e:
                if self.stop.is_set():
                    break
                log("%s; retrying in %.1f s", e, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            backoff = 0.1
            if launch:
                self.start(launch)

    def withdraw_claim(self):
        """Close the claim poll's connection: the server claims nothing more for a stopping worker."""
        sock = getattr(self.claim_connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def has_free_slot(self):
        with self.lock:
            return len(self.runs) < self.slots

    def start(self, launch):
        with self.lock:
            if not self.stop.is_set():
                run = RunProcess(self, launch)
                self.runs[run.run_id] = run
                run.start()
                return
        self.release(launch)  # claimed while stopping

    def release(self, launch):
        """Give a run that nothing was started for back to the queue, for another worker."""
        with contextlib.suppress(Unavailable):
            self.api.post("/api/worker/release", claim_of(launch))
            log("run %d: given back to the queue", launch["run_id"])

    def forget(self, run):
        with self.lock:
            self.runs.pop(run.run_id, None)
        self.slot_free.set()

    def active(self):
        with self.lock:
            return list(self.runs.values())

    def confirm(self, launch):
        """Whether a claimed run is still ours, asked before anything starts for it: its first heartbeat
        confirms the claim. The server takes back a claim not confirmed within claim_confirm_seconds
        (this worker stopped, or the claim's answer reached it late), so past that it is dropped."""
        deadline = time.monotonic() + launch["claim_confirm_seconds"]
        backoff = 0.1
        while True:
            try:
                gone = self.api.post("/api/worker/heartbeat", {"runs": [claim_of(launch)]}).get("gone")
                if launch["run_id"] not in gone:
                    return True
                log("run %d: not ours any more (the server took its claim back); dropping it", launch["run_id"])
                return False
            except (Unavailable, TypeError) as e:
                if time.monotonic() + backoff > deadline:
                    log("run %d: could not confirm its claim (%s); dropping it, the server queues it again",
                        launch["run_id"], e)
                    return False
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def heartbeat_forever(self):
        while True:
            runs = self.active()
            if runs:
                try:
                    answer = self.api.post("/api/worker/heartbeat", {"runs": [claim_of(r.launch) for r in runs]})
                    for run in runs:
                        if run.run_id in answer.get("gone", []):
                            run.stop_nextflow("gone")
                        elif run.run_id in answer.get("cancel", []):
                            run.stop_nextflow("cancel")
                except (Unavailable, TypeError) as e:
                    log("heartbeat failed: %s", e)
            time.sleep(HEARTBEAT_SECONDS)

    def report_finished(self, launch, exit_code, error, cancelled):
        """Tell the server how the run ended. The report must not be lost: try until the server takes
        it (it may be restarting, or busy) or refuses it for good; once the worker stops, for at most
        STOP_REPORT_SECONDS."""
        body = dict(claim_of(launch), exit_code=exit_code, error=error, cancelled=cancelled, worker=self.name)
        backoff, give_up_at = 0.2, None
        while True:
            try:
                self.api.post("/api/workflows/%d/finished" % launch["workflow_id"], body)
                return
            except Refused as e:
                log("run %d: the server refused the report of its end: %s", launch["run_id"], e)
                return
            except Unavailable as e:
                if self.stop.is_set():
                    give_up_at = give_up_at or time.monotonic() + STOP_REPORT_SECONDS
                    if time.monotonic() > give_up_at:
                        log("run %d: GIVING UP reporting its end (exit code %s) as the worker stops: %s. The "
                            "server will mark it lost.", launch["run_id"], exit_code, e)
                        return
                log("run %d: reporting its end failed (%s); retrying in %.1f s", launch["run_id"], e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def shutdown(self):
        runs = self.active()
        if runs:
            log("stopping %d run(s)", len(runs))
        for run in runs:
            run.stop_nextflow("stop")
        for run in runs:
            run.join()

    def request_stop(self, signum, frame):
        log("received %s; stopping", signal.Signals(signum).name)
        self.stop.set()
        self.slot_free.set()


LAUNCH_PATHS = ("cwd", "run_dir", "params_file", "console_log", "config_file")


def launch_problem(launch):
    """Why the worker does not run `launch`, or None. Besides its shape (the server is newer or older),
    the worker checks what it cheaply can, should an answer not be the server's own: every path it
    writes or starts in is absolute and normalised, and nextflow's first word is `run`."""
    keys = {"run_id": int, "workflow_id": int, "argv": list, "cwd": str, "params": dict, "params_file": str,
            "run_dir": str, "config_file": str, "config": str, "config_url_token": str, "console_log": str,
            "claim_secret": str, "claim_confirm_seconds": (int, float)}
    if not (isinstance(launch, dict) and all(isinstance(launch.get(k), t) for k, t in keys.items())
            and all(isinstance(a, str) for a in launch["argv"])):
        return "its fields are not those of a launch (is the server of another version?)"
    for key in LAUNCH_PATHS:
        if not os.path.isabs(launch[key]) or os.path.normpath(launch[key]) != launch[key]:
            return "its %s is not an absolute, normalised path: %r" % (key, launch[key][:200])
    if launch["argv"][:1] != ["run"]:
        return "its nextflow command is not `nextflow run ...`"
    return None


# ==== Self-check ====
# `nfapi_worker.py --check`, run by the operator on the node where runs execute, finds out what a first
# run would: one line per check, `ok`, `warn` (it works, but read this) or `PROBLEM` with how to fix
# it. The exit status is 1 when a run would fail or report nothing.

# The oldest Java each Nextflow release runs on, newest release first. Sources: Nextflow's install
# page ("Changed in version 24.11.0-edge: Support for Java versions prior to 17 was dropped",
# nextflow-io/nextflow#5045), its 22.x to 24.10 editions ("Java 11 (or later ...)"), and
# nextflow-io/nextflow#3643 (21.10 still ran on Java 8).
JAVA_MINIMUM = (((24, 11), 17), ((22, 1), 11), ((0, 0), 8))
# The weblog is the nf-weblog plugin since 23.07-edge, built in before; its newest release, 1.1.2,
# needs Nextflow 23.10 or later (NEXTFLOW.md 1.1).
WEBLOG_PLUGIN = (((23, 10), "1.1.2"), ((23, 7), "1.0.0"))
CHECK_TIMEOUT = 120  # seconds for `nextflow -version` (the launcher may download Nextflow first)
SHARED_DATA_FIX = ("mount the server's data folder on this node at the same path (%s), and run the worker as the "
                   "user that runs the server")
AHEAD = " (on a node with internet access, with the same NXF_HOME)"


class Report:
    """The lines of the self-check, printed as they come."""

    def __init__(self):
        self.failed = False

    def line(self, level, name, text, fix=None):
        self.failed = self.failed or level == "PROBLEM"
        print("%-7s %-22s %s%s" % (level, name, text, " -- fix: " + fix if fix else ""), flush=True)

    def ok(self, name, text):
        self.line("ok", name, text)

    def warn(self, name, text, fix):
        self.line("warn", name, text, fix)

    def problem(self, name, text, fix):
        self.line("PROBLEM", name, text, fix)


def self_check(api, nextflow, env):
    """Run every check; return the exit status."""
    report = Report()
    version = check_nextflow(report, nextflow, env)
    check_java(report, env, version)
    check_weblog_plugin(report, env, version)
    info = check_server(report, api)
    if info is not None:
        check_data_folder(report, info)
        for name in sorted(info["pipelines"]):
            check_pipeline(report, name, info["pipelines"][name], env)
    return 1 if report.failed else 0


def version_tuple(text):
    return tuple(int(n) for n in re.findall(r"[0-9]+", text)[:3])


def check_nextflow(report, nextflow, env):
    """nextflow's version as `nextflow -version` prints it (`version 24.10.4 build 5934`), or None."""
    path = shutil.which(nextflow)
    if path is None:
        report.problem("nextflow", "%s not found" % nextflow, "install Nextflow (curl -s https://get.nextflow.io | "
                       "bash) and put it on PATH, or give its path with --nextflow")
        return None
    out = run_for_output([path, "-version"], env)
    m = re.search(r"\bversion\s+([0-9]+\.[0-9]+\.[0-9]+\S*)", out or "")
    if m is None:
        last = (out or "").strip().splitlines()[-1:] or ["no output"]
        report.problem("nextflow", "`%s -version` failed: %s" % (path, last[0]),
                       "run `%s -version` here to see why (often Java: see the next line)" % path)
        return None
    report.ok("nextflow", "%s, version %s" % (path, m.group(1)))
    return m.group(1)


def run_for_output(argv, env):
    """What a command prints on stdout and stderr, or None when it cannot be run."""
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=CHECK_TIMEOUT).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None


def java_command(env):
    """The java that Nextflow's launcher script starts: $NXF_JAVA_HOME, $JAVA_CMD, $JAVA_HOME, then PATH."""
    home = env.get("NXF_JAVA_HOME")
    if not home and env.get("JAVA_CMD") and os.access(env["JAVA_CMD"], os.X_OK):
        return env["JAVA_CMD"]
    home = home or env.get("JAVA_HOME")
    if home and os.path.isdir(home):
        return os.path.join(home, "bin", "java")
    return shutil.which("java", path=env.get("PATH"))


def check_java(report, env, nextflow_version):
    java = java_command(env)
    out = run_for_output([java, "-version"], env) if java else None
    m = re.search(r'version "([^"]+)"', out or "")  # `openjdk version "17.0.2" 2022-01-18`, on stderr
    fix = "install Java %d or later (with SDKMAN!: sdk install java 17.0.10-tem) and set JAVA_HOME or NXF_JAVA_HOME"
    if m is None:
        report.problem("java", "no working java (NXF_JAVA_HOME, JAVA_CMD, JAVA_HOME, PATH)", fix % 17)
        return
    numbers = version_tuple(m.group(1))
    major = numbers[1] if numbers[:1] == (1,) and len(numbers) > 1 else numbers[0]  # 1.8.0_382 is Java 8
    if nextflow_version is None:
        report.ok("java", "%s, Java %s (Nextflow's minimum unknown: see the nextflow line)" % (java, m.group(1)))
        return
    minimum = next(oldest for since, oldest in JAVA_MINIMUM if version_tuple(nextflow_version) >= since)
    if major < minimum:
        report.problem("java", "%s is Java %s; Nextflow %s needs Java %d or later"
                       % (java, m.group(1), nextflow_version, minimum), fix % minimum)
    else:
        report.ok("java", "%s, Java %s (Nextflow %s needs %d+)" % (java, m.group(1), nextflow_version, minimum))


def check_weblog_plugin(report, env, nextflow_version):
    """Without nf-weblog a run sends no progress; Nextflow downloads it at first use, which an offline
    node cannot."""
    plugin = WEBLOG_PLUGIN[0][1] if nextflow_version is None else next(
        (release for since, release in WEBLOG_PLUGIN if version_tuple(nextflow_version) >= since), None)
    if plugin is None:
        report.ok("nf-weblog", "built into Nextflow %s" % nextflow_version)
        return
    folder = env.get("NXF_PLUGINS_DIR") or os.path.join(nextflow_home(env), "plugins")
    found = sorted(name for name in listdir_or_empty(folder) if name.startswith("nf-weblog-"))
    install = "nextflow plugin install nf-weblog@%s" % plugin
    if found:
        report.ok("nf-weblog", "%s in %s" % (found[-1], folder))
    elif env.get("NXF_OFFLINE") == "true":
        report.problem("nf-weblog", "not in %s, and NXF_OFFLINE=true stops Nextflow from downloading it: runs would "
                       "report no progress" % folder, install + AHEAD)
    else:
        report.warn("nf-weblog", "not in %s: Nextflow downloads it at the first run" % folder,
                    "if compute nodes are offline or NXF_OFFLINE=true, install it ahead: %s" % install)


def listdir_or_empty(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def check_server(report, api):
    """What the server says the worker needs (GET /api/worker/check), or None when it cannot be asked."""
    where = api.where
    try:
        api.get("/api/nextflow-workflows")
        info = api.get("/api/worker/check")
    except (Refused, Unsigned) as e:
        report.problem("server", "%s refused the token: %s" % (where, e), "give the server's API token (its "
                       "<data>/api-token) in NFAPI_TOKEN or with --token-file, and check that %s is nfapi"
                       % where)
        return None
    except Unavailable as e:
        report.problem("server", "cannot reach %s: %s" % (where, e), "start the server, or give its URL as this "
                       "node reaches it with --server ($NFAPI_SERVER)")
        return None
    report.ok("server", "%s answers %s" % (where, "with the token" if api.token else "its owner with no token"))
    return info


def check_data_folder(report, info):
    """Runs need the server's data folder here, at the same path: nextflow reads the workflow folders
    and writes in the launch and run folders."""
    fix = SHARED_DATA_FIX % info["data_dir"]
    try:
        inode = os.stat(info["data_dir"]).st_ino
    except OSError as e:
        report.problem("data folder", "%s is not on this node: %s" % (info["data_dir"], e.strerror), fix)
        return
    if inode != info["data_dir_inode"]:
        report.problem("data folder", "%s here is another folder than the server's (inode %d here, %d there)"
                       % (info["data_dir"], inode, info["data_dir_inode"]), fix)
    try:
        os.listdir(info["workflows_dir"])
        report.ok("data folder", "reads %s" % info["workflows_dir"])
    except OSError as e:
        report.problem("data folder", "cannot read %s: %s" % (info["workflows_dir"], e.strerror), fix)
    for folder in (info["launch_dir"], info["runs_dir"]):
        try:
            fd, path = tempfile.mkstemp(dir=folder, prefix=".nfapi-check-")
            os.close(fd)
            os.unlink(path)
            report.ok("data folder", "writes in %s" % folder)
        except OSError as e:
            report.problem("data folder", "cannot write in %s: %s" % (folder, e.strerror), fix)


def check_pipeline(report, name, pipeline, env):
    label = "pipeline %s" % name
    if "script" in pipeline:
        if os.path.isfile(pipeline["script"]):
            report.ok(label, pipeline["script"])
        else:
            report.problem(label, "%s is not on this node" % pipeline["script"], "make the pipeline's folder "
                           "available on this node at the same path")
    else:
        check_remote_pipeline(report, label, pipeline, env)
    version = pipeline.get("nextflow_version")
    if version:
        fetch = "NXF_VER=%s nextflow -version" % version
        if pinned_version_problem(version, env):
            report.problem(label, "pinned to Nextflow %s, which is not here and NXF_OFFLINE=true" % version,
                           fetch + AHEAD)
        elif has_framework(env, version):
            report.ok(label, "pinned to Nextflow %s, which is here" % version)
        else:
            report.warn(label, "pinned to Nextflow %s: the launcher downloads it at the first run" % version,
                        "if compute nodes are offline, fetch it ahead: %s" % fetch)


def check_remote_pipeline(report, label, pipeline, env):
    """A remote pipeline runs from Nextflow's assets ($NXF_ASSETS or $NXF_HOME/assets/<org>/<name>)."""
    project = "/".join(re.sub(r"\.git$", "", pipeline["pipeline"]).rstrip("/").split("/")[-2:])
    folder = os.path.join(env.get("NXF_ASSETS") or os.path.join(nextflow_home(env), "assets"), project)
    pull = "nextflow pull " + pipeline["pipeline"] + (" -r " + pipeline["revision"] if "revision" in pipeline else "")
    if os.path.isdir(folder):
        report.ok(label, "%s is in %s" % (pipeline["pipeline"], folder))
    elif env.get("NXF_OFFLINE") == "true":
        report.problem(label, "%s is not in %s, and NXF_OFFLINE=true stops Nextflow from pulling it"
                       % (pipeline["pipeline"], folder), pull + AHEAD)
    else:
        report.warn(label, "%s is not in %s: Nextflow pulls it at the first run" % (pipeline["pipeline"], folder),
                    "if compute nodes are offline, pull it ahead: %s" % pull)


# ==== Main ====

def read_token(args):
    """The API token; None on the server's Unix socket without one (its owner needs none there)."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="ascii") as f:
                return f.read().strip()
        except OSError as e:
            sys.exit("nfapi-worker: cannot read the token file: %s" % e)
    if os.environ.get("NFAPI_TOKEN"):
        return os.environ["NFAPI_TOKEN"]
    if args.server.startswith("unix:"):
        return None
    sys.exit("nfapi-worker: set NFAPI_TOKEN or give --token-file, or reach the server on its Unix socket "
             "with --server unix:PATH")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Run nextflow for runs scheduled on an nfapi server.")
    parser.add_argument("--server", default=os.environ.get("NFAPI_SERVER", "http://127.0.0.1:8000"),
                        help="the server's URL, or unix:PATH for its Unix socket ($NFAPI_SERVER)")
    parser.add_argument("--slots", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--nextflow", default="nextflow", help="the nextflow binary (default: nextflow on PATH)")
    parser.add_argument("--token-file", help="read the API token from this file instead of $NFAPI_TOKEN")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when stopping a run (default 30)")
    parser.add_argument("--check", action="store_true",
                        help="check this node (nextflow, Java, nf-weblog, the server, the data folder, the "
                             "pipelines), print one line per check and exit, 1 if a run would fail")
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    if os.sep in args.nextflow:
        args.nextflow = os.path.abspath(args.nextflow)  # nextflow starts in its launch folder, not here
    if not shutil.which(args.nextflow):
        log("warning: %s is not an executable; runs will fail until it is", args.nextflow)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        sys.exit(self_check(Api(args.server, read_token(args)), args.nextflow, child_environment()))
    version = nextflow_version(args.nextflow)
    worker = Worker(Api(args.server, read_token(args)), args.slots, args.nextflow, args.grace, version)
    # SIGINT and SIGHUP stay ignored when they were at start: `make run` (whose background jobs ignore
    # SIGINT) stops the worker itself, before the server; nohup means "outlive the logout".
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, worker.request_stop)
    log("serving %s with %d slot(s), nextflow=%s (nextflow %s)", args.server, args.slots, args.nextflow,
        version or "of unknown version")
    worker.serve()
    log("stopped")


if __name__ == "__main__":
    main()

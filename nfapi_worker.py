#!/usr/bin/env python3
"""nfapi_worker: claim runs from an nfapi server and run `nextflow` for them.

    NFAPI_TOKEN=... python3 nfapi_worker.py --server http://127.0.0.1:8000 [--slots N] [--nextflow PATH]
    python3 nfapi_worker.py --server http://login1:8000 --token-file nfapi-data/api-token

The worker talks to the server over HTTP only (it never opens the database), so it can run on
another node that shares the data folder, and several workers can serve one server. It long-polls
`/api/worker/claim` for queued runs, runs up to --slots at once, heartbeats them every second, and
reports each end to `/api/workflows/<id>/finished` with nextflow's exit code. Each claim comes with a
claim secret that every report about the run shows. A claimed run is confirmed with a heartbeat
before nextflow starts: a claim the server has taken back meanwhile is dropped. A run the server
answers as `gone` (it gave up on it) has its nextflow stopped at once.

Nextflow gets the launch the server built: the argv after the binary (user values are only in the
params file, where `$` is written `\\u0024` so Nextflow replaces no `${...}` in them), its launch
folder as cwd, umask 077, and the worker's environment minus NFAPI_TOKEN. Its stdout and stderr go
to the run's console.log. It runs in its own process group and gets SIGTERM if the worker dies
(Linux). It holds a lock on its launch folder for as long as it runs, even past the worker: a
launch whose folder is locked is refused, so a workflow never has two nextflow at once. Cancelling
sends SIGTERM (nextflow then kills its tasks and reports them ABORTED), then SIGKILL to the whole
group after --grace seconds. SIGTERM or Ctrl-C on the worker withdraws its claim poll, stops all its
runs that way and reports them before exiting.
"""

import argparse
import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

# ==== Settings ====

HEARTBEAT_SECONDS = 1.0
CLAIM_WAIT_SECONDS = 20
MAX_BACKOFF_SECONDS = 10.0
CONSOLE_TAIL_BYTES = 4000
STOP_REPORT_SECONDS = 60  # how long a stopping worker keeps trying to report a run's end
VERSION_SECONDS = 60  # for `nextflow -version`, once at start
PR_SET_PDEATHSIG = 1
LAUNCH_LOCK = ".nfapi-launch.lock"
# The only session id the worker puts after -resume: anything else would be an option of its own.
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def log(message, *args):
    sys.stderr.write("nfapi-worker: " + (message % args if args else message) + "\n")
    sys.stderr.flush()


# ==== Server API ====

class Unavailable(Exception):
    """The server could not be reached or gave an answer we cannot use; try again later."""


class Refused(Unavailable):
    """The server refused the request for good (a 4xx answer): asking again cannot change it."""


class Api:
    def __init__(self, server, token):
        url = urllib.parse.urlsplit(server)
        self.connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self.address = url.netloc
        self.prefix = url.path.rstrip("/")
        self.token = token

    def connection(self, timeout=30):
        return self.connection_class(self.address, timeout=timeout)

    def post(self, path, body, timeout=30, connection=None):
        """POST JSON on a new connection (or `connection`) and return the answer, a JSON object
        ({} for an empty body). The worker can only log and go on, so every failure is raised as
        Unavailable with the server's message; Refused when asking again cannot help."""
        conn = connection or self.connection(timeout)
        try:
            conn.request("POST", self.prefix + path, body=json.dumps(body).encode(), headers={
                "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable("%s: %s" % (path, e))
        finally:
            conn.close()
        if resp.status >= 400:
            message = "%s answered %d: %s" % (path, resp.status, data[:300].decode("utf-8", "replace"))
            raise (Refused if resp.status < 500 and resp.status not in (408, 429) else Unavailable)(message)
        try:
            answer = json.loads(data) if data.strip() else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Unavailable("%s answered something that is not a JSON object" % path)
        return answer


def claim_of(launch):
    """What shows the server that a report about a run comes from the worker holding its claim."""
    return {"run_id": launch["run_id"], "claim_secret": launch["claim_secret"]}


# ==== One run ====

def prepare_child():
    """In the child before exec: files nextflow creates are private (.nextflow/history holds the
    weblog URL with its secret), and Linux sends SIGTERM when the thread that started it dies, so a
    worker killed with SIGKILL leaves no nextflow running unseen."""
    os.umask(0o077)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_environment():
    env = dict(os.environ)
    env.pop("NFAPI_TOKEN", None)  # pipeline tasks must never see the API token
    return env


def nextflow_version(binary):
    """The version `nextflow -version` prints ("24.10.0"), or None when it cannot say. Real Nextflow
    prints a banner with `version 24.10.0 build 5928`; it may start a JVM, or download itself once."""
    try:
        out = subprocess.run([binary, "-version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=child_environment(), timeout=VERSION_SECONDS).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(rb"version\s+([0-9]+\.[0-9]+\.[0-9]+)", out)
    return found.group(1).decode() if found else None


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
            problem = resume_problem(launch["argv"])
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
        argv = [self.worker.nextflow] + launch["argv"]
        with self.lock:
            if self.stopped_because:
                return None, "stopped before nextflow started"
            try:
                self.proc = subprocess.Popen(argv, cwd=launch["cwd"], env=child_environment(), stdin=subprocess.DEVNULL,
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
    def __init__(self, api, slots, nextflow, grace):
        self.api = api
        self.slots = slots
        self.nextflow = nextflow
        self.grace = grace
        self.name = "%s:%d" % (socket.gethostname(), os.getpid())
        self.version = nextflow_version(nextflow)
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
                         "pid": os.getpid(), "slots": self.slots, "nextflow_version": self.version}
                launch = self.api.post("/api/worker/claim", claim, connection=self.claim_connection).get("run")
                if launch is not None and not is_launch(launch):
                    raise Unavailable("the claim answer is not a launch: %r" % (launch,))
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


def is_launch(launch):
    keys = {"run_id": int, "workflow_id": int, "argv": list, "cwd": str, "params": dict, "params_file": str,
            "run_dir": str, "console_log": str, "claim_secret": str, "claim_confirm_seconds": (int, float)}
    return isinstance(launch, dict) and all(isinstance(launch.get(k), t) for k, t in keys.items()) \
        and all(isinstance(a, str) for a in launch["argv"])


# ==== Main ====

def read_token(args):
    if args.token_file:
        try:
            with open(args.token_file, encoding="ascii") as f:
                return f.read().strip()
        except OSError as e:
            sys.exit("nfapi-worker: cannot read the token file: %s" % e)
    if os.environ.get("NFAPI_TOKEN"):
        return os.environ["NFAPI_TOKEN"]
    sys.exit("nfapi-worker: set NFAPI_TOKEN or give --token-file")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Run nextflow for runs scheduled on an nfapi server.")
    parser.add_argument("--server", default=os.environ.get("NFAPI_SERVER", "http://127.0.0.1:8000"),
                        help="the server's URL ($NFAPI_SERVER)")
    parser.add_argument("--slots", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--nextflow", default="nextflow", help="the nextflow binary (default: nextflow on PATH)")
    parser.add_argument("--token-file", help="read the API token from this file instead of $NFAPI_TOKEN")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when stopping a run (default 30)")
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
    worker = Worker(Api(args.server, read_token(args)), args.slots, args.nextflow, args.grace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.request_stop)
    log("serving %s with %d slot(s), nextflow=%s", args.server, args.slots, args.nextflow)
    worker.serve()
    log("stopped")


if __name__ == "__main__":
    main()

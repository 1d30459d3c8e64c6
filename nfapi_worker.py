#!/usr/bin/env python3
"""nfapi_worker: claim runs from an nfapi server and run `nextflow` for them.

    NFAPI_TOKEN=... python3 nfapi_worker.py --server http://127.0.0.1:8000 [--slots N] [--nextflow PATH]
    python3 nfapi_worker.py --server http://login1:8000 --token-file nfapi-data/api-token

The worker talks to the server over HTTP only (it never opens the database), so it can run on
another node that shares the data folder, and several workers can serve one server. It long-polls
`/api/worker/claim` for queued runs, runs up to --slots at once, heartbeats them every second, and
reports each end to `/api/workflows/<id>/finished` with nextflow's exit code.

Nextflow gets the launch the server built: the argv after the binary (user values are only in the
params file), its launch folder as cwd, and the worker's environment minus NFAPI_TOKEN. Its stdout
and stderr go to the run's console.log. It runs in its own process group and gets SIGTERM if the
worker dies (Linux). Cancelling sends SIGTERM (nextflow then kills its tasks and reports them
ABORTED), then SIGKILL to the whole group after --grace seconds. SIGTERM or Ctrl-C on the worker
stops all its runs that way and reports them before exiting.
"""

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# ==== Settings ====

HEARTBEAT_SECONDS = 1.0
CLAIM_WAIT_SECONDS = 20
MAX_BACKOFF_SECONDS = 10.0
CONSOLE_TAIL_BYTES = 4000
PR_SET_PDEATHSIG = 1


def log(message, *args):
    sys.stderr.write("nfapi-worker: " + (message % args if args else message) + "\n")
    sys.stderr.flush()


# ==== Server API ====

class Unavailable(Exception):
    """The server could not be reached or gave an answer we cannot use; try again later."""


class Api:
    def __init__(self, server, token):
        self.server = server.rstrip("/")
        self.token = token

    def post(self, path, body, timeout=30):
        """POST JSON and return the decoded answer ({} for an empty body); 4xx answers are raised as
        Unavailable too, with the server's message, since the worker can only log and go on."""
        request = urllib.request.Request(self.server + path, data=json.dumps(body).encode(), method="POST", headers={
            "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            raise Unavailable("%s answered %d: %s" % (path, e.code, e.read()[:300].decode("utf-8", "replace")))
        except (OSError, ValueError) as e:
            raise Unavailable("%s: %s" % (path, e))
        try:
            return json.loads(data) if data.strip() else {}
        except ValueError:
            raise Unavailable("%s answered something that is not JSON" % path)


# ==== One run ====

def die_with_parent():
    """In the child before exec: ask Linux for SIGTERM when the thread that started us dies,
    so a worker killed with SIGKILL leaves no nextflow running unseen."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_environment():
    env = dict(os.environ)
    env.pop("NFAPI_TOKEN", None)  # pipeline tasks must never see the API token
    return env


def write_private(path, data):
    temp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def keep_nextflow_log(launch):
    """Copy .nextflow.log into the run folder: nextflow rolls it away at the workflow's next run."""
    with contextlib.suppress(OSError):
        with open(os.path.join(launch["cwd"], ".nextflow.log"), "rb") as f:
            write_private(os.path.join(launch["run_dir"], "nextflow.log"), f.read())


def console_tail(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - CONSOLE_TAIL_BYTES))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class RunProcess(threading.Thread):
    """Start nextflow for one claimed run, wait for it, and report how it ended."""

    def __init__(self, worker, launch):
        super().__init__(name="run-%d" % launch["run_id"], daemon=True)
        self.worker = worker
        self.launch = launch
        self.run_id = launch["run_id"]
        self.proc = None
        self.cancelled = False
        self.lock = threading.Lock()

    def run(self):
        try:
            exit_code, error = self.execute()
        except OSError as e:
            exit_code, error = None, "the worker could not prepare the run: %s" % e
        self.worker.report_finished(self.launch, exit_code, error, self.cancelled)
        self.worker.forget(self)

    def execute(self):
        launch = self.launch
        for folder in (launch["run_dir"], launch["cwd"]):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        write_private(launch["params_file"], json.dumps(launch["params"], indent=2).encode())
        argv = [self.worker.nextflow] + launch["argv"]
        fd = os.open(launch["console_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "wb") as console, self.lock:
            if self.cancelled:
                return None, "cancelled before nextflow started"
            try:
                self.proc = subprocess.Popen(argv, cwd=launch["cwd"], env=child_environment(), stdin=subprocess.DEVNULL,
                                             stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=die_with_parent)
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

    def cancel(self):
        """SIGTERM now (nextflow stops its tasks itself), SIGKILL to the group after the grace period."""
        with self.lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self.proc is None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        log("run %d: cancelling (SIGTERM to %d)", self.run_id, self.proc.pid)
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
        self.stop = threading.Event()
        self.runs = {}
        self.lock = threading.Lock()
        self.slot_free = threading.Event()

    def serve(self):
        """Claim on one thread, heartbeat on another; the main thread only waits for a stop signal."""
        threading.Thread(target=self.heartbeat_forever, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.claim_forever, name="claim", daemon=True).start()
        self.stop.wait()
        self.shutdown()

    def claim_forever(self):
        backoff = 0.1
        while not self.stop.is_set():
            if not self.has_free_slot():
                self.slot_free.wait(1.0)
                self.slot_free.clear()
                continue
            try:
                answer = self.api.post("/api/worker/claim", {"worker": self.name, "wait": CLAIM_WAIT_SECONDS},
                                       timeout=CLAIM_WAIT_SECONDS + 30)
                if not isinstance(answer, dict):
                    raise Unavailable("the claim answer is not a JSON object")
                launch = answer.get("run")
                if launch is not None and not is_launch(launch):
                    raise Unavailable("the claim answer is not a launch: %r" % (launch,))
            except Unavailable as e:
                log("%s; retrying in %.1f s", e, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            backoff = 0.1
            if launch:
                self.start(launch)

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
        # Claimed while stopping: give it back to the queue for another worker.
        with contextlib.suppress(Unavailable):
            self.api.post("/api/worker/release", {"worker": self.name, "run_id": launch["run_id"]})

    def forget(self, run):
        with self.lock:
            self.runs.pop(run.run_id, None)
        self.slot_free.set()

    def active(self):
        with self.lock:
            return list(self.runs.values())

    def heartbeat_forever(self):
        while True:
            runs = self.active()
            if runs:
                try:
                    answer = self.api.post("/api/worker/heartbeat", {"worker": self.name, "runs": [r.run_id for r in runs]})
                    for run in runs:
                        if run.run_id in answer.get("cancel", []):
                            run.cancel()
                except (Unavailable, AttributeError, TypeError) as e:
                    log("heartbeat failed: %s", e)
            time.sleep(HEARTBEAT_SECONDS)

    def report_finished(self, launch, exit_code, error, cancelled):
        """Tell the server how the run ended; keep trying while it is down (it may be restarting)."""
        body = {"run_id": launch["run_id"], "exit_code": exit_code, "error": error, "cancelled": cancelled,
                "worker": self.name}
        backoff, deadline = 0.2, time.monotonic() + max(3 * launch.get("lease_seconds", 60), 60)
        while True:
            try:
                self.api.post("/api/workflows/%d/finished" % launch["workflow_id"], body)
                return
            except Unavailable as e:
                if time.monotonic() > deadline:
                    log("run %d: giving up reporting its end: %s", launch["run_id"], e)
                    return
                log("run %d: reporting its end failed (%s); retrying", launch["run_id"], e)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def shutdown(self):
        runs = self.active()
        if runs:
            log("stopping %d run(s)", len(runs))
        for run in runs:
            run.cancel()
        for run in runs:
            run.join()

    def request_stop(self, signum, frame):
        log("received %s; stopping", signal.Signals(signum).name)
        self.stop.set()
        self.slot_free.set()


def is_launch(launch):
    keys = {"run_id": int, "workflow_id": int, "argv": list, "cwd": str, "params": dict, "params_file": str,
            "run_dir": str, "console_log": str}
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
    # SIGINT and SIGHUP stay ignored when they were at start: `make run` (whose background jobs ignore
    # SIGINT) stops the worker itself, before the server; nohup means "outlive the logout".
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, worker.request_stop)
    log("serving %s with %d slot(s), nextflow=%s", args.server, args.slots, args.nextflow)
    worker.serve()
    log("stopped")


if __name__ == "__main__":
    main()

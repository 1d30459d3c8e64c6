#!/usr/bin/env python3
"""A stand-in for `nextflow run`, for nfapi's tests and `make demo`. It is NOT Nextflow.

It imitates Nextflow 24.10 with nf-weblog 1.1.x as described in ../shared/reference/NEXTFLOW.md:
the `run` options nfapi uses, `${name}` replaced in the params file's text before it is parsed, the
weblog envelopes (compact ASCII JSON, HashMap key order, utcTime at send time), one background
sender posting in order over keep-alive without retries (`WARN:` once per distinct failure),
waiting for its queue only after `completed`, the console lines, `.nextflow.log`
(rolled on each start), `.nextflow/history`, exit codes 0 and 1, and these sequences (section 1.9):
A success, B task failure (terminate), C `errorStrategy 'finish'`, D error before any task (no
`completed`; `error` may be lost), F `-resume` with every task cached (no task events, same runId),
G SIGTERM/SIGINT/SIGHUP (running tasks killed and reported ABORTED), H receiver down.

Tasks are real child processes (`sh -c 'sleep ...'`) in the work dir, one per process in the script
(`process NAME {`), run stage by stage in script order.

Knobs, read from the environment (a test sets them on the worker, whose environment nextflow inherits):
    FAKE_NF_TASKS=n            tasks per process (default 1)
    FAKE_NF_TASK_SECONDS=s     how long each task runs (default 0.05)
    FAKE_NF_FAIL=PROC          the first task of process PROC exits 1 (sequence B)
    FAKE_NF_ERROR_STRATEGY=finish   with FAKE_NF_FAIL: sequence C instead of B
    FAKE_NF_SCRIPT_ERROR=msg   the script fails before any task (sequence D)
    FAKE_NF_RECORD=dir         write dir/<run name>.json: argv, cwd, params file content, params read, environment
"""

import datetime
import hashlib
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

STARTED_AT = time.time()
VERSION = "24.10.0"
BUILD = 5928
URL_CHECK = re.compile(r"^(https|http)://[-a-zA-Z0-9+&@#/%?=~_|!:,.;]*[-a-zA-Z0-9+&@#/%=~_|]")
RUN_NAME = re.compile(r"^[a-z](?:[a-z\d]|[-_](?=[a-z\d])){0,79}$", re.IGNORECASE)
UNKNOWN_EXIT = 2147483647
VALUE_OPTIONS = {"-params-file", "-name", "-work-dir", "-w", "-profile", "-c", "-config", "-r", "-revision"}
OPTIONAL_VALUE_OPTIONS = {"-with-weblog", "-ansi-log", "-resume"}


class Abort(Exception):
    """An error before the run starts: `ERROR ~ message`, exit 1."""


def fail(message):
    raise Abort(message)


# ==== Command line ====

def parse_run_args(args):
    """`nextflow run` options as Launcher.normalizeArgs + JCommander would see them."""
    opts, cli_params, positional = {}, {}, []
    i = 0
    while i < len(args):
        arg = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if nxt is not None and (not nxt.startswith("-") or len(nxt) == 1 or " " in nxt):
                    value, i = nxt, i + 1
                else:
                    value = "true"
            cli_params[key] = value
        elif arg in VALUE_OPTIONS:
            if nxt is None:
                fail("Expected a value after parameter %s" % arg)
            opts[arg], i = nxt, i + 1
        elif arg in OPTIONAL_VALUE_OPTIONS:
            takes = nxt is not None and not nxt.startswith("-")
            if arg == "-resume":
                takes = takes and (nxt == "last" or re.fullmatch(r"[0-9a-f-]{36}", nxt) is not None)
            if arg == "-ansi-log":
                takes = takes and nxt in ("true", "false")
            opts[arg] = nxt if takes else ("last" if arg == "-resume" else "-" if arg == "-with-weblog" else "true")
            i += 1 if takes else 0
        elif arg.startswith("-"):
            fail("Unknown option: %s -- Check the available commands and options and syntax with 'help'" % arg)
        else:
            positional.append(arg)
        i += 1
    if not positional:
        fail("No project name was specified")
    return positional[0], opts, cli_params


def load_params(path, cli_params, script):
    params = {}
    if path:
        if not path.lower().endswith((".json", ".yml", ".yaml")):
            fail("Not a valid params file extension: %s -- It must be one of the following: json,yml,yaml" % path)
        if not os.path.exists(path):
            fail("Specified params file does not exist: %s" % os.path.abspath(path))
        try:
            with open(path) as f:
                params = json.loads(replace_vars(f.read(), script))
        except ValueError as e:
            fail("Cannot parse params file: %s - Cause: %s" % (path, e))
    params.update(cli_params)
    return {camel_case(k): v for k, v in params.items()}


def replace_vars(text, script):
    """CmdRun.replaceVars0: `${name}` in the params file's text, before it is parsed, becomes a config
    variable; an unknown name stays as it is, with a warning."""
    project = os.path.dirname(os.path.abspath(script))
    binding = {"baseDir": project, "projectDir": project, "launchDir": os.getcwd()}

    def variable(m):
        if m.group(1) in binding:
            return binding[m.group(1)]
        print("WARN: Missing params file variable: %s" % m.group(0), flush=True)
        return m.group(0)
    return re.sub(r"\$\{([A-Za-z_$][A-Za-z0-9_$]*)\}", variable, text)


def camel_case(name):
    return re.sub(r"-([a-z])", lambda m: m.group(1).upper(), name)


# ==== Launch directory files ====

def roll_log(path):
    for n in range(8, 0, -1):
        if os.path.exists("%s.%d" % (path, n)):
            os.replace("%s.%d" % (path, n), "%s.%d" % (path, n + 1))
    if os.path.exists(path):
        os.replace(path, path + ".1")


class Log:
    def __init__(self, path):
        roll_log(path)
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, logger, message):
        stamp = datetime.datetime.now().strftime("%b-%d %H:%M:%S.%f")[:-3]
        with self.lock:
            self.file.write("%s [%s] DEBUG %s - %s\n" % (stamp, threading.current_thread().name, logger, message))


class History:
    """`.nextflow/history`: timestamp, duration, run name, status, revision, session, command (tab-separated)."""

    def __init__(self, path):
        self.path = path

    def lines(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]

    def add(self, name, revision, session, command):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write("\t".join([time.strftime("%Y-%m-%d %H:%M:%S"), "-", name, "-", revision, session, command]) + "\n")

    def finish(self, name, duration_ms, ok):
        lines = self.lines()
        for line in lines:
            if line[2] == name:
                line[1], line[3] = "%dms" % duration_ms, "OK" if ok else "ERR"
        with open(self.path, "w") as f:
            f.writelines("\t".join(line) + "\n" for line in lines)


# ==== Weblog ====

class WebLogSender:
    """One background thread posting queued events in order, one at a time, like a GPars Agent."""

    def __init__(self, url, console):
        self.url = urllib.parse.urlsplit(url)
        self.console = console
        self.queue = queue.Queue()
        self.warned = set()
        self.conn = None
        threading.Thread(target=self.loop, name="WebLogAgent", daemon=True).start()

    def send(self, envelope):
        self.queue.put(envelope)

    def await_all(self):
        self.queue.join()

    def loop(self):
        while True:
            envelope = self.queue.get()
            try:
                self.post(envelope)
            except Exception as e:  # nf-weblog >= 1.1.1 logs the message once and carries on
                self.conn = None
                message = describe(e, self.url.geturl())
                if message not in self.warned:
                    self.warned.add(message)
                    self.console("WARN: " + message)
            finally:
                self.queue.task_done()

    def post(self, envelope):
        # utcTime is computed inside the queued closure: the time of sending, not of the event.
        envelope["utcTime"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        target = self.url.path or "/"
        if self.url.query:
            target += "?" + self.url.query
        reused = self.conn is not None
        try:
            resp = self.exchange(target, body)
        except (ConnectionError, http.client.RemoteDisconnected):
            if not reused:
                raise
            # The JDK's HttpURLConnection retries a POST once on a fresh connection when a pooled
            # keep-alive connection turns out to be dead (sun.net.http.retryPost, default true).
            self.conn = None
            resp = self.exchange(target, body)
        if resp.status >= 400:
            raise IOError("Server returned HTTP response code: %d for URL: %s" % (resp.status, self.url.geturl()))


    def exchange(self, target, body):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.url.hostname, self.url.port or 80)
        self.conn.request("POST", target, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "Nextflow/" + VERSION})
        resp = self.conn.getresponse()
        resp.read()
        return resp


def describe(error, url):
    if isinstance(error, ConnectionRefusedError):
        return "java.net.ConnectException: Connection refused"
    if isinstance(error, IOError) and str(error).startswith("Server returned"):
        return str(error)
    return "java.io.IOException: %s" % error


def envelope(run, event, trace=None, metadata=None):
    """HashMap iteration order: the payload first, then runId, event, runName (utcTime at send)."""
    message = {}
    if trace is not None:
        message["trace"] = trace
    if metadata is not None:
        message["metadata"] = metadata
    message.update(runId=run.session, event=event, runName=run.name)
    return message


def offset_date_time(epoch_seconds):
    """How Groovy's JsonGenerator writes an OffsetDateTime (>= 19.10): its bean properties."""
    local = datetime.datetime.fromtimestamp(epoch_seconds).astimezone()
    offset = int(local.utcoffset().total_seconds())
    sign = "+" if offset >= 0 else "-"
    return {"dayOfMonth": local.day, "dayOfWeek": local.strftime("%A").upper(), "dayOfYear": local.timetuple().tm_yday,
            "hour": local.hour, "minute": local.minute, "month": local.strftime("%B").upper(),
            "monthValue": local.month, "nano": local.microsecond * 1000, "second": local.second, "year": local.year,
            "offset": {"id": "Z" if offset == 0 else "%s%02d:%02d" % (sign, abs(offset) // 3600, abs(offset) % 3600 // 60),
                       "totalSeconds": offset, "rules": {"fixedOffset": True, "transitions": [], "transitionRules": []}}}


# ==== Tasks ====

class Task:
    def __init__(self, run, task_id, process, index):
        self.run, self.task_id, self.process, self.index = run, task_id, process, index
        digest = hashlib.md5(("%s/%s/%d" % (run.session, process, index)).encode()).hexdigest()
        self.hash = digest[:2] + "/" + digest[2:8]
        self.workdir = os.path.join(run.work_dir, digest[:2], digest[2:])
        self.name = "%s (%d)" % (process, index)
        self.status, self.exit = "NEW", UNKNOWN_EXIT
        self.submit = self.start = self.complete = 0
        self.error_action = None
        self.proc = None

    def trace(self):
        record = {"task_id": self.task_id, "status": self.status, "hash": self.hash, "name": self.name,
                  "exit": self.exit, "submit": self.submit, "start": self.start, "process": self.process,
                  "tag": None, "module": [], "container": None, "attempt": 1,
                  "script": "\n    sleep %s\n    " % self.run.task_seconds, "scratch": None,
                  "workdir": self.workdir, "queue": None, "cpus": 1, "memory": None, "disk": None, "time": None,
                  "env": None}
        if self.status in ("COMPLETED", "FAILED", "ABORTED"):
            record.update(error_action=self.error_action, complete=self.complete,
                          duration=self.complete - self.submit, realtime=self.complete - (self.start or self.complete))
        record["native_id"] = self.proc.pid if self.proc else None
        return record

    def execute(self):
        run = self.run
        os.makedirs(self.workdir, exist_ok=True)
        failing = self.process == run.fail_process and self.index == 1
        # `exec` so a kill reaches the task itself, as .command.run's TERM trap makes sure in Nextflow.
        script = FAILING_SCRIPT % self.name if failing else "exec sleep %s" % run.task_seconds
        with open(os.path.join(self.workdir, ".command.sh"), "w") as f:
            f.write("#!/bin/bash -ue\n%s\n" % script)
        self.submit = now_ms()
        self.status = "SUBMITTED"
        run.console("[%s] Submitted process > %s" % (self.hash, self.name))
        run.emit("process_submitted", self)
        with run.lock:
            if run.stopping:
                return self.finish("ABORTED", UNKNOWN_EXIT)
            self.proc = start_task(script, self.workdir)
        self.start, self.status = now_ms(), "RUNNING"
        run.emit("process_started", self)
        returncode = self.proc.wait()
        with open(os.path.join(self.workdir, ".exitcode"), "w") as f:
            f.write(str(returncode))
        if returncode < 0 or run.killing:
            return self.finish("ABORTED", UNKNOWN_EXIT)
        if returncode:
            self.error_action = "FINISH" if run.error_strategy == "finish" else "TERMINATE"
            return self.finish("FAILED", returncode)
        return self.finish("COMPLETED", 0)

    def finish(self, status, exit_code):
        self.status, self.exit, self.complete = status, exit_code, now_ms()
        self.run.emit("process_completed", self)
        if status == "FAILED":
            self.run.task_failed(self)
        elif status == "COMPLETED":
            self.run.cache_done(self)


# What the FAKE_NF_FAIL task prints before it fails: its .command.err ends with these lines.
FAILING_SCRIPT = "echo 'fake task %s: starting' >&2; echo 'ERROR: fake failure (FAKE_NF_FAIL)' >&2; exit 1"


def start_task(script, workdir):
    """The task's process, its stdout and stderr in the work folder's .command.out and .command.err,
    where Nextflow's .command.run sends them."""
    with open(os.path.join(workdir, ".command.out"), "wb") as out, \
            open(os.path.join(workdir, ".command.err"), "wb") as err:
        return subprocess.Popen(["sh", "-c", script], cwd=workdir, stdout=out, stderr=err)


def now_ms():
    return int(time.time() * 1000)


# ==== The run ====

class Run:
    def __init__(self, script, opts, params, argv):
        self.script = script
        self.opts = opts
        self.params = params
        self.argv = argv
        self.launch_dir = os.getcwd()
        self.work_dir = os.path.abspath(opts.get("-work-dir") or opts.get("-w") or os.environ.get("NXF_WORK") or "work")
        self.task_seconds = float(os.environ.get("FAKE_NF_TASK_SECONDS", "0.05"))
        self.tasks_per_process = int(os.environ.get("FAKE_NF_TASKS", "1"))
        self.fail_process = os.environ.get("FAKE_NF_FAIL")
        self.error_strategy = os.environ.get("FAKE_NF_ERROR_STRATEGY", "terminate")
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = self.killing = False
        self.failed_task = None
        self.signal_name = None
        self.tasks = []
        self.threads = []
        self.cached = 0
        self.sender = None

    def console(self, line):
        print(line, flush=True)

    def emit(self, event, task=None):
        if self.sender:
            self.sender.send(envelope(self, event, trace=task.trace() if task else None))

    def task_failed(self, task):
        with self.lock:
            if self.failed_task is None:
                self.failed_task = task
        self.wake.set()

    def cache_done(self, task):
        with self.lock:
            with open(os.path.join(self.cache_dir, "done"), "a") as f:
                f.write("%s/%d\n" % (task.process, task.index))

    def on_signal(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self.wake.set()

    @property
    def cache_dir(self):
        return os.path.join(self.launch_dir, ".nextflow", "cache", self.session)

    def metadata(self, start, complete=None, success=False, exit_status=None, error=None):
        ok = sum(t.status == "COMPLETED" for t in self.tasks)
        failed = sum(t.status == "FAILED" for t in self.tasks)
        aborted = sum(t.status == "ABORTED" for t in self.tasks)
        return {"parameters": self.params, "workflow": {
            "runName": self.name, "scriptId": self.revision, "scriptFile": os.path.abspath(self.script),
            "scriptName": os.path.basename(self.script), "repository": None, "commitId": None, "revision": None,
            "start": offset_date_time(start), "complete": offset_date_time(complete) if complete else None,
            "duration": int((complete - start) * 1000) if complete else None, "container": {},
            "commandLine": "nextflow " + " ".join(self.argv), "nextflow": {
                "version": VERSION, "build": BUILD, "timestamp": "2024-10-27T19:24:55Z", "enable": {"dsl": 2}},
            "success": success, "projectDir": os.path.dirname(os.path.abspath(self.script)),
            "projectName": os.path.basename(self.script), "launchDir": self.launch_dir, "outputDir": self.launch_dir,
            "workDir": self.work_dir, "homeDir": os.path.expanduser("~"), "userName": os.environ.get("USER", "user"),
            "exitStatus": exit_status, "errorMessage": error, "errorReport": error,
            "profile": self.opts.get("-profile", "standard"), "sessionId": self.session, "resume": self.resume,
            "stubRun": False, "preview": False, "containerEngine": None, "configFiles": [], "failOnIgnore": False,
            "stats": {"succeededCount": ok, "succeedCount": ok, "cachedCount": self.cached, "failedCount": failed,
                      "ignoredCount": 0, "pendingCount": 0, "submittedCount": 0, "runningCount": 0,
                      "retriesCount": 0, "abortedCount": aborted, "peakRunning": self.tasks_per_process},
            "manifest": {"name": None, "version": None, "mainScript": "main.nf"}}}

    def main(self):
        """Return the exit code."""
        with open(self.script, "rb") as f:
            source = f.read()
        self.revision = hashlib.md5(source).hexdigest()[:10]
        processes = re.findall(rb"^\s*process\s+([A-Za-z_]\w*)\s*\{", source, re.MULTILINE)
        processes = [p.decode() for p in processes]
        history = History(os.path.join(self.launch_dir, ".nextflow", "history"))
        self.name = self.opts.get("-name") or "fake_%s" % uuid.uuid4().hex[:6]
        if not RUN_NAME.match(self.name) or self.name == "last":
            fail("Not a valid run name: `%s`" % self.name)
        if any(line[2] == self.name for line in history.lines()):
            fail("Run name `%s` has been already used -- Specify a different one" % self.name)
        weblog = self.opts.get("-with-weblog")
        if weblog == "-":
            weblog = "http://localhost"
        if weblog is not None and not URL_CHECK.match(weblog):
            fail("Only http and https are supported -- The given URL was: %s" % weblog)
        self.resume, self.session = False, os.environ.get("NXF_UUID") or str(uuid.uuid4())
        resume = self.opts.get("-resume")
        if resume:
            sessions = [line[5] for line in history.lines()]
            if resume != "last":
                self.resume, self.session = True, resume
            elif sessions:
                self.resume, self.session = True, sessions[-1]
            else:
                self.console("WARN: It appears you have never run this project before -- Option `-resume` is ignored")
        log = Log(os.path.join(self.launch_dir, ".nextflow.log"))
        log.write("nextflow.cli.Launcher", "$> nextflow " + " ".join(self.argv))
        self.console("N E X T F L O W  ~  version %s" % VERSION)
        self.console("Launching `%s` [%s] DSL2 - revision: %s" % (self.script, self.name, self.revision))
        history.add(self.name, self.revision, self.session, "nextflow " + " ".join(self.argv))
        os.makedirs(self.cache_dir, exist_ok=True)
        done_before = set()
        if self.resume and os.path.exists(os.path.join(self.cache_dir, "done")):
            with open(os.path.join(self.cache_dir, "done")) as f:
                done_before = set(f.read().split())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        start = time.time()
        if weblog:
            self.sender = WebLogSender(weblog, self.console)
        if self.sender:
            self.sender.send(envelope(self, "started", metadata=self.metadata(start)))
        log.write("nextflow.Session", "Session start; runName: %s; sessionId: %s" % (self.name, self.session))

        if os.environ.get("FAKE_NF_SCRIPT_ERROR"):
            return self.script_error(os.environ["FAKE_NF_SCRIPT_ERROR"], log)

        error, exit_status = self.run_stages(processes, done_before)
        success = error is None
        if self.signal_name or (self.failed_task and self.error_strategy != "finish"):
            self.emit("error")  # Session.abort: no trace
        self.kill_running()
        complete = time.time()
        if self.sender:
            self.sender.send(envelope(self, "completed", metadata=self.metadata(
                start, complete, success, exit_status, error)))
            self.sender.await_all()
        history.finish(self.name, int((complete - start) * 1000), success)
        log.write("nextflow.Session", "Session await > all processes finished; success: %s" % success)
        if not success:
            self.console("ERROR ~ %s" % error.splitlines()[0])
            self.console("")
            self.console(" -- Check '.nextflow.log' file for details")
        return 0 if success else 1

    def run_stages(self, processes, done_before):
        """Run each process's tasks, stage by stage; return (errorMessage, exitStatus) or (None, 0)."""
        task_id = 0
        for process in processes:
            keys = ["%s/%d" % (process, i) for i in range(1, self.tasks_per_process + 1)]
            if all(k in done_before for k in keys):
                self.cached += len(keys)
                for k in keys:
                    digest = hashlib.md5(("%s/%s" % (self.session, k)).encode()).hexdigest()
                    self.console("[%s/%s] Cached process > %s (%s)" % (digest[:2], digest[2:8], process, k.split("/")[1]))
                continue
            stage = []
            for index in range(1, self.tasks_per_process + 1):
                task_id += 1
                stage.append(Task(self, task_id, process, index))
            self.tasks += stage
            threads = [threading.Thread(target=t.execute, name="Task-%d" % t.task_id) for t in stage]
            self.threads += threads
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                self.wake.wait(0.02)
                self.wake.clear()
                if self.signal_name or (self.failed_task and self.error_strategy != "finish"):
                    break
            if self.failed_task and self.error_strategy == "finish":
                self.emit("error", self.failed_task)  # Session.cancel: error carries the failed task's trace
                for thread in threads:
                    thread.join()
            if self.signal_name:
                return self.signal_name, None
            if self.failed_task:
                return self.task_error_message(self.failed_task), self.failed_task.exit
        return None, 0

    def task_error_message(self, task):
        return ("Error executing process > '%s'\n\nCaused by:\n  Process `%s` terminated with an error exit status (%d)"
                % (task.name, task.name, task.exit))

    def kill_running(self):
        with self.lock:
            self.stopping = True
            running = [t for t in self.tasks if t.proc and t.proc.poll() is None]
            if running:
                self.killing = True
                self.console("WARN: Killing running tasks (%d)" % len(running))
                for t in running:
                    t.proc.terminate()
        for thread in self.threads:
            thread.join()

    def script_error(self, message, log):
        """Sequence D (<= 25.04): `error` queued, no `completed`, nothing waits for the queue."""
        if self.sender:
            self.sender.await_all()  # `started` went out while the script was being compiled
            self.emit("error")
        log.write("nextflow.cli.Launcher", "Script error: " + message)
        self.console("ERROR ~ %s" % message)
        self.console("")
        self.console(" -- Check '.nextflow.log' file for details")
        return 1


def record(run_name, argv, opts, params):
    """What this run was started with: its argv, the params file's text and the params it read from
    both (after `${name}` replacement and `--param` overrides)."""
    folder = os.environ.get("FAKE_NF_RECORD")
    if not folder:
        return
    params_text = None
    if opts.get("-params-file") and os.path.exists(opts["-params-file"]):
        with open(opts["-params-file"]) as f:
            params_text = f.read()
    with open(os.path.join(folder, "%s.json" % run_name), "w") as f:
        json.dump({"argv": argv, "cwd": os.getcwd(), "params_file": params_text, "params": params, "pid": os.getpid(),
                   "started_at": STARTED_AT, "environ": dict(os.environ)}, f)


def main(argv):
    if argv[:1] in (["-v"], ["-version"]):
        print("nextflow version %s.%d (fake stand-in for tests)" % (VERSION, BUILD))
        return 0
    if not argv or argv[0] != "run":
        print("ERROR ~ this stand-in only implements `nextflow run`", file=sys.stderr)
        return 1
    try:
        script, opts, cli_params = parse_run_args(argv[1:])
        params = None
        try:
            params = load_params(opts.get("-params-file"), cli_params, script)
        finally:
            record(opts.get("-name", "unnamed"), argv, opts, params)
        if not os.path.isfile(script):
            fail("Cannot find script file: %s" % script)
        return Run(script, opts, params, argv).main()
    except Abort as e:
        print("ERROR ~ %s" % e, flush=True)
        print("", flush=True)
        print(" -- Check '.nextflow.log' file for details", flush=True)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # like System.exit: queued weblog posts not awaited are dropped

#!/usr/bin/env python3
"""A stand-in for `nextflow run`, for nfapi's tests and `make demo`. It is NOT Nextflow.

It imitates Nextflow 24.10 with nf-weblog 1.1.x as described in ../shared/reference/NEXTFLOW.md:
the `run` options nfapi uses, `-c` config files (the part of Groovy config syntax nfapi writes:
`scope { key = value }` and `scope.key = value`, with single-quoted strings, numbers, true and false),
`${name}` replaced in the params file's text before it is parsed, the weblog (`-with-weblog` or the
`weblog` scope, `weblog.basicToken` sent as HTTP Basic) with its envelopes (compact ASCII JSON,
HashMap key order, utcTime at send time), one background sender posting in order over keep-alive
without retries (`WARN:` once per distinct failure), waiting for its queue only after `completed`,
task metrics in `process_completed` only when a trace, report or timeline is on, the trace file
(section 3.6a), an HTML report and timeline (fake content), the console lines, `.nextflow.log`
(rolled on each start), `.nextflow/history`, exit codes 0 and 1, `-v`/`-version`, `plugin install`
(a folder in $NXF_PLUGINS_DIR or $NXF_HOME/plugins), and these sequences (section 1.9):
A success, B task failure (terminate), C `errorStrategy 'finish'`, D error before any task (no
`completed`; `error` may be lost), F `-resume` with every task cached (no task events, same runId),
G SIGTERM/SIGINT/SIGHUP (running tasks killed and reported ABORTED), H receiver down.

Tasks are real child processes (`sh -c 'sleep ...'`) in the work dir, one per process in the script
(`process NAME {`), run stage by stage in script order. Their metrics are made up but known: task n
of a process (n from 1) reports %cpu 90+n, %mem 0.1*n, peak_rss n*10 MiB, peak_vmem n*100 MiB,
rchar 1000*n, wchar 500*n, read_bytes 4096*n and write_bytes 8192*n.

NXF_VER sets the version it claims to be (default 24.10.0). Before 23.10 the weblog is Nextflow's own
(no plugin): it ignores weblog.basicToken and logs nothing when a post fails.

Knobs, read from the environment (a test sets them on the worker, whose environment nextflow inherits):
    FAKE_NF_TASKS=n            tasks per process (default 1)
    FAKE_NF_TASK_SECONDS=s     how long each task runs (default 0.05)
    FAKE_NF_FAIL=PROC          the first task of process PROC exits 1 (sequence B)
    FAKE_NF_ERROR_STRATEGY=finish   with FAKE_NF_FAIL: sequence C instead of B
    FAKE_NF_SCRIPT_ERROR=msg   the script fails before any task (sequence D)
    FAKE_NF_DROP_POSTS=event:n,...  the first n posts of each event are lost on the way (never sent)
    FAKE_NF_RECORD=dir         write dir/<run name>.json: argv, cwd, params file content, params read, the config
                               read from -c files, environment
    FAKE_NF_PUBLISH=1          each completed task appends a line to <params.outdir>/<process in lower
                               case>.txt, standing in for `publishDir` (`make demo` then has results/)
"""

import base64
import datetime
import hashlib
import http.client
import json
import math
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
VERSION = os.environ.get("NXF_VER") or "24.10.0"
BUILD = 5928
PLUGIN_RELEASES = {"nf-weblog": "1.1.2"}  # the newest release of each plugin the stand-in knows
URL_CHECK = re.compile(r"^(https|http)://[-a-zA-Z0-9+&@#/%?=~_|!:,.;]*[-a-zA-Z0-9+&@#/%=~_|]")
RUN_NAME = re.compile(r"^[a-z](?:[a-z\d]|[-_](?=[a-z\d])){0,79}$", re.IGNORECASE)
UNKNOWN_EXIT = 2147483647
VALUE_OPTIONS = {"-params-file", "-name", "-work-dir", "-w", "-profile", "-r", "-revision"}
CONFIG_OPTIONS = {"-c", "-config"}  # may be repeated: each adds a config file
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
        elif arg in VALUE_OPTIONS or arg in CONFIG_OPTIONS:
            if nxt is None:
                fail("Expected a value after parameter %s" % arg)
            if arg in CONFIG_OPTIONS:
                opts.setdefault("-c", []).append(nxt)
            else:
                opts[arg] = nxt
            i += 1
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


# ==== Config files ====
# Groovy, as Nextflow's ConfigParser reads it, limited to what nfapi writes: assignments
# `a.b = value` and blocks `a { b = value }`, statements ended by a newline or `;`, `//` and `/* */`
# comments; values are single-quoted strings (no `$` interpolation in them; one line; the escapes
# \b \t \n \f \r \" \' \\ \$, octal \0 to \377, \uXXXX and a backslash ending the line, which joins
# the next), integers and decimals, true and false.
# Anything else is refused, as Groovy refuses most of it.

SIMPLE_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "'": "'", "\\": "\\", "$": "$",
                  "\n": ""}
ESCAPE = re.compile(r"u+([0-9A-Fa-f]{4})|([0-3][0-7]{0,2}|[4-7][0-7]?)|(.)", re.DOTALL)
CONFIG_TOKEN = re.compile(r"""
    (?P<space>[ \t]+|\\\n) | (?P<comment>//[^\n]*|/\*.*?\*/) | (?P<end>[\n;]) | (?P<brace>[{}]) | (?P<equals>=)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?![\w.])) | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<string>')
""", re.VERBOSE | re.DOTALL)


def load_configs(paths):
    """The settings of the -c files, later files overriding earlier ones, as nested dicts."""
    config = {}
    for path in paths:
        if not os.path.isfile(path):
            fail("The specified configuration file does not exist: %s -- check the name or choose another file"
                 % os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            merge(config, parse_config_text(f.read(), path))
    return config


def merge(into, settings):
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def parse_config_text(text, path):
    try:
        return config_block(config_tokens(text), 0, nested=False)[0]
    except ValueError as e:
        fail("Unable to parse config file: '%s'\n\n  %s" % (os.path.abspath(path), e))


def config_tokens(text):
    """[(kind, value)] with comments and blanks left out; strings, numbers and booleans are `value`s."""
    tokens, i = [], 0
    while i < len(text):
        m = CONFIG_TOKEN.match(text, i)
        if not m:
            raise ValueError("Unexpected input: %r" % text[i:i + 20])
        kind = m.lastgroup
        if kind == "string":
            value, i = string_literal(text, m.end())
            tokens.append(("value", value))
            continue
        i = m.end()
        if kind == "number":
            tokens.append(("value", float(m.group()) if "." in m.group() else int(m.group())))
        elif kind == "name" and m.group() in ("true", "false"):
            tokens.append(("value", m.group() == "true"))
        elif kind not in ("space", "comment"):
            tokens.append((kind, m.group()))
    return tokens


def string_literal(text, i):
    """The value of the single-quoted Groovy string whose text starts at `i`, and the index after it."""
    if text.startswith("''", i):
        raise ValueError("triple-quoted strings are not supported")
    out = []
    while True:
        if i >= len(text) or text[i] in "\r\n":
            raise ValueError("a single-quoted string must end on its own line")
        ch = text[i]
        if ch == "'":
            # \uXXXX gives UTF-16 code units: a pair of surrogates is one character.
            value = "".join(out).encode("utf-16-be", "surrogatepass").decode("utf-16-be", "surrogatepass")
            return value, i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        escape = ESCAPE.match(text, i + 1)
        if escape.group(1):
            out.append(chr(int(escape.group(1), 16)))
        elif escape.group(2):
            out.append(chr(int(escape.group(2), 8)))
        elif escape.group(3) in SIMPLE_ESCAPES:
            out.append(SIMPLE_ESCAPES[escape.group(3)])
        else:
            raise ValueError("Unexpected character after a backslash: %r" % text[i:i + 6])
        i = escape.end()


def config_block(tokens, i, nested):
    """The statements from token `i` to the end, or to the `}` closing a block: (settings, index after)."""
    settings = {}
    while i < len(tokens):
        kind, value = tokens[i]
        following = [k for k, _ in tokens[i + 1:i + 4]]
        if kind == "end":
            i += 1
        elif kind == "brace" and value == "}" and nested:
            return settings, i + 1
        elif kind == "name" and tokens[i + 1:i + 2] == [("brace", "{")]:
            block, i = config_block(tokens, i + 2, nested=True)
            merge(settings, nest(value, block))
        elif kind == "name" and following[:2] == ["equals", "value"] and following[2:] in ([], ["end"], ["brace"]):
            merge(settings, nest(value, tokens[i + 2][1]))
            i += 3
        else:
            raise ValueError("Unexpected token: %r" % (value,))
    if nested:
        raise ValueError("Unexpected end of file: a block is not closed")
    return settings, i


def nest(dotted, value):
    for name in reversed(dotted.split(".")):
        value = {name: value}
    return value


def setting(config, dotted, default=None):
    for name in dotted.split("."):
        if not isinstance(config, dict) or name not in config:
            return default
        config = config[name]
    return config


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

    def runs(self):
        """The whole lines (a command with a line break in an argument spans several lines)."""
        return [line for line in self.lines() if len(line) >= 7]

    def add(self, name, revision, session, command):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write("\t".join([time.strftime("%Y-%m-%d %H:%M:%S"), "-", name, "-", revision, session, command]) + "\n")

    def finish(self, name, duration_ms, ok):
        lines = self.lines()
        for line in lines:
            if len(line) >= 7 and line[2] == name:
                line[1], line[3] = "%dms" % duration_ms, "OK" if ok else "ERR"
        with open(self.path, "w") as f:
            f.writelines("\t".join(line) + "\n" for line in lines)


# ==== Weblog ====

class WebLogSender:
    """One background thread posting queued events in order, one at a time, like a GPars Agent."""

    def __init__(self, url, basic_token, console, log):
        self.url = urllib.parse.urlsplit(url)
        self.headers = {"Content-Type": "application/json", "User-Agent": "Nextflow/" + VERSION}
        if basic_token:
            self.headers["Authorization"] = "Basic " + base64.b64encode(basic_token.encode()).decode()
        self.console = console
        self.log = log
        self.drops = posts_to_drop(os.environ.get("FAKE_NF_DROP_POSTS", ""))
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
                if self.drops.get(envelope["event"]):
                    self.drops[envelope["event"]] -= 1
                else:
                    self.post(envelope)
            except Exception as e:  # nf-weblog >= 1.1.1 logs the message once and carries on
                self.conn = None
                message = describe(e, self.url.geturl())
                if message not in self.warned and version_at_least(23, 10):  # before: the Agent keeps it silently
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
        self.log("nextflow.util.SimpleHttpClient", "Successfully sent message to %s -- received status code %d."
                 % (self.url.geturl(), resp.status))

    def exchange(self, target, body):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.url.hostname, self.url.port or 80)
        self.conn.request("POST", target, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        resp.read()
        return resp


def posts_to_drop(knob):
    """FAKE_NF_DROP_POSTS `event:n,...` as {event: n}."""
    drops = {}
    for item in filter(None, knob.split(",")):
        event, _, count = item.partition(":")
        drops[event] = int(count or 1)
    return drops


def version_at_least(major, minor):
    return tuple(int(part) for part in re.findall(r"[0-9]+", VERSION)[:2]) >= (major, minor)


def weblog_settings(opts, config):
    """(URL, basicToken or None) when the weblog is on (-with-weblog or weblog.enabled), else (None, None).
    The URL is checked as WebLogObserver does, before anything is sent."""
    url = opts.get("-with-weblog")
    if url is None and setting(config, "weblog.enabled") is not True:
        return None, None
    if url in (None, "-"):
        url = setting(config, "weblog.url") or "http://localhost"
    if not URL_CHECK.match(url):
        fail("Only http and https are supported -- The given URL was: %s" % url)
    token = setting(config, "weblog.basicToken") if version_at_least(23, 10) else None  # nf-weblog >= 1.1.0
    if token is not None and ":" not in str(token):
        fail("Invalid auth token provided - should be 'USERNAME:PASSWORD'.")
    return url, token


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


# ==== Trace file, report and timeline ====

# TraceRecord.FIELDS: every field a trace file may show, and how it is written.
TRACE_FIELD_TYPES = {
    "task_id": "str", "hash": "str", "native_id": "str", "process": "str", "module": "str", "container": "str",
    "tag": "str", "name": "str", "status": "str", "exit": "str", "submit": "date", "start": "date",
    "complete": "date", "duration": "time", "realtime": "time", "%cpu": "perc", "%mem": "perc", "rss": "mem",
    "vmem": "mem", "peak_rss": "mem", "peak_vmem": "mem", "rchar": "mem", "wchar": "mem", "syscr": "num",
    "syscw": "num", "read_bytes": "mem", "write_bytes": "mem", "attempt": "num", "workdir": "str", "script": "str",
    "scratch": "str", "queue": "str", "cpus": "num", "memory": "mem", "disk": "mem", "time": "time", "env": "str",
    "error_action": "str", "vol_ctxt": "num", "inv_ctxt": "num", "hostname": "str", "cpu_model": "str"}
DEFAULT_TRACE_FIELDS = "task_id,hash,native_id,name,status,exit,submit,duration,realtime,%cpu,peak_rss,peak_vmem," \
                       "rchar,wchar"
MEMORY_UNITS = ["B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB"]


def report_file(config, scope, default_name):
    """The path of a trace/report/timeline that is on, checked as TraceHelper.newFileWriter does; else None."""
    if setting(config, scope + ".enabled") is not True:
        return None
    path = os.path.abspath(setting(config, scope + ".file") or default_name)
    if os.path.exists(path) and setting(config, scope + ".overwrite") is not True:
        fail("%s file already exists: %s -- enable the '%s.overwrite' option in your config file to overwrite "
             "existing files" % (scope.capitalize(), path, scope))
    return path


class TraceFile:
    """TraceFileObserver: the field names, then one line per task when it completes or is cached (flushed
    at once), and at the end of the run the tasks still submitted or running."""

    def __init__(self, path, config):
        self.fields = [f for f in re.split(r"[, ]+", str(setting(config, "trace.fields", DEFAULT_TRACE_FIELDS))) if f]
        for name in self.fields:
            if name not in TRACE_FIELD_TYPES:
                fail("Not a valid trace field name: '%s'" % name)
        self.raw = setting(config, "trace.raw") is True
        self.sep = setting(config, "trace.sep", "\t")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "w")
        self.lock = threading.Lock()
        self.line(self.fields)

    def line(self, values):
        with self.lock:
            self.file.write(self.sep.join(values) + "\n")
            self.file.flush()

    def task(self, record):
        self.line([trace_text(record.get(name), TRACE_FIELD_TYPES[name], self.raw) for name in self.fields])

    def close(self, in_flight):
        for record in in_flight:
            self.task(record)
        self.file.close()


def trace_text(value, kind, raw):
    """TraceRecord.getFmtStr: `-` for a missing value; with `raw`, dates, times, sizes and percentages
    are plain numbers (epoch ms, ms, bytes, the percentage without `%`)."""
    if raw and kind in ("date", "time", "mem", "perc"):
        kind = "num"
    if kind == "str":
        if isinstance(value, (int, float)):
            return "-" if value == UNKNOWN_EXIT else str(value)
        return str(value) if value else "-"
    if value is None or (kind == "date" and not value):
        return "-"
    if kind == "num":
        return str(value)
    if kind == "date":
        return datetime.datetime.fromtimestamp(value / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if kind == "perc":
        return "%.1f%%" % value
    if kind == "mem":
        group = int(math.log10(value) / math.log10(1024)) if value > 0 else 0
        return "0" if value <= 0 else "%s %s" % (decimal_text(value / 1024 ** group), MEMORY_UNITS[group])
    return duration_text(value)


def duration_text(ms):
    """nextflow.util.Duration's text: `50ms`, `1.5s`, `1m 5s`, `2h 3m`, `1d 2h 3m 4s`."""
    if ms < 1000:
        return "%dms" % ms
    if ms < 60000:
        return decimal_text(math.floor(ms / 100 + 0.5) / 10) + "s"
    seconds = ms // 1000
    parts = [(seconds // 86400, "d"), (seconds // 3600 % 24, "h"), (seconds // 60 % 60, "m"), (seconds % 60, "s")]
    return " ".join("%d%s" % part for part in parts if part[0])


def decimal_text(number):
    return ("%.1f" % number).rstrip("0").rstrip(".")


def write_html_report(path, title, run):
    """A stand-in for Nextflow's HTML report or timeline: clearly fake, self-contained."""
    rows = "".join("<tr><td>%s</td><td>%s</td><td>%s</td></tr>" % (t.task_id, t.name, t.status) for t in run.tasks)
    with open(path, "w") as f:
        f.write("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title></head><body>\n"
                "<h1>%s of %s (fake_nextflow stand-in, not Nextflow)</h1>\n<table>%s</table>\n</body></html>\n"
                % (title, title, run.name, rows))


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
            # .command.trace, written by the task's wrapper when metrics are on; a killed task has none.
            if self.run.metrics and self.status != "ABORTED" and self.proc:
                record.update(self.metrics())
        record["native_id"] = self.proc.pid if self.proc else None
        return record

    def metrics(self):
        n = self.index
        return {"%cpu": 90.0 + n, "cpu_model": "Stand-in CPU @ 2.00GHz", "rchar": 1000 * n, "wchar": 500 * n,
                "syscr": 10 * n, "syscw": 5 * n, "read_bytes": 4096 * n, "write_bytes": 8192 * n,
                "%mem": round(0.1 * n, 1), "vmem": 100 * 2 ** 20 * n, "rss": 10 * 2 ** 20 * n,
                "peak_vmem": 100 * 2 ** 20 * n, "peak_rss": 10 * 2 ** 20 * n, "vol_ctxt": n, "inv_ctxt": 0}

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
        if self.run.trace_file:
            self.run.trace_file.task(self.trace())
        if status == "FAILED":
            self.run.task_failed(self)
        elif status == "COMPLETED":
            self.run.cache_done(self)
            publish(self)


def publish(task):
    outdir = task.run.params.get("outdir")
    if not os.environ.get("FAKE_NF_PUBLISH") or not isinstance(outdir, str):
        return
    os.makedirs(outdir, exist_ok=True)  # relative to the launch folder, as in Nextflow
    with open(os.path.join(outdir, task.process.lower() + ".txt"), "a") as f:
        f.write("%s: output of the stand-in (tests/fake_nextflow.py runs no pipeline)\n" % task.name)


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
    def __init__(self, script, opts, params, config, argv):
        self.script = script
        self.opts = opts
        self.params = params
        self.config = config
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
        self.trace_file = None
        self.reports = {}  # title: path of the HTML report and timeline that are on
        self.metrics = False

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
        if any(line[2] == self.name for line in history.runs()):
            fail("Run name `%s` has been already used -- Specify a different one" % self.name)
        weblog, basic_token = weblog_settings(self.opts, self.config)
        self.resume, self.session = False, os.environ.get("NXF_UUID") or str(uuid.uuid4())
        resume = self.opts.get("-resume")
        if resume:
            sessions = [line[5] for line in history.runs()]
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
        self.open_reports(start)
        if weblog:
            self.sender = WebLogSender(weblog, basic_token, self.console, log.write)
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
        self.close_reports()
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

    def open_reports(self, start):
        """The trace, report and timeline observers; any of them turns task metrics on (section 1.7)."""
        stamp = datetime.datetime.fromtimestamp(start).strftime("%Y%m%d-") + str(int(start * 1000) % 86400000)
        trace = report_file(self.config, "trace", "trace-%s.txt" % stamp)
        for scope, title in (("report", "Execution report"), ("timeline", "Execution timeline")):
            path = report_file(self.config, scope, "%s-%s.html" % (scope, stamp))
            if path:
                self.reports[title] = path
        if trace:
            self.trace_file = TraceFile(trace, self.config)
        self.metrics = bool(trace or self.reports)

    def close_reports(self):
        """onFlowComplete: the tasks still in flight end the trace; the report and timeline are written."""
        if self.trace_file:
            self.trace_file.close([t.trace() for t in self.tasks if t.status in ("SUBMITTED", "RUNNING")])
        for title, path in self.reports.items():
            write_html_report(path, title, self)

    def run_stages(self, processes, done_before):
        """Run each process's tasks, stage by stage; return (errorMessage, exitStatus) or (None, 0)."""
        task_id = 0
        for process in processes:
            keys = ["%s/%d" % (process, i) for i in range(1, self.tasks_per_process + 1)]
            if all(k in done_before for k in keys):
                self.cached += len(keys)
                for index in range(1, self.tasks_per_process + 1):
                    task_id += 1
                    self.task_cached(Task(self, task_id, process, index))
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

    def task_cached(self, task):
        """onProcessCached: a console line and a trace line; the weblog sends nothing (section 1.7)."""
        task.status, task.exit = "CACHED", 0
        self.console("[%s] Cached process > %s" % (task.hash, task.name))
        if self.trace_file:
            self.trace_file.task(task.trace())

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


def record(run_name, argv, opts, params, config):
    """What this run was started with: its argv, the params file's text and the params it read from
    both (after `${name}` replacement and `--param` overrides), and the config its -c files gave."""
    folder = os.environ.get("FAKE_NF_RECORD")
    if not folder:
        return
    params_text = None
    if opts.get("-params-file") and os.path.exists(opts["-params-file"]):
        with open(opts["-params-file"]) as f:
            params_text = f.read()
    with open(os.path.join(folder, "%s.json" % run_name), "w") as f:
        json.dump({"argv": argv, "cwd": os.getcwd(), "params_file": params_text, "params": params, "config": config,
                   "pid": os.getpid(), "started_at": STARTED_AT, "environ": dict(os.environ)}, f)


def version_text(full):
    """What `nextflow -v` (one line) and `nextflow -version` (the splash) print."""
    if not full:
        return "nextflow version %s.%d" % (VERSION, BUILD)
    return ("\n      N E X T F L O W\n      version %s build %d\n      created 27-10-2024 19:24 UTC\n"
            "      cite doi:10.1038/nbt.3820\n      http://nextflow.io\n" % (VERSION, BUILD))


def plugin_install(args):
    """`nextflow plugin install <id>[@<version>],...`: each plugin not yet in the plugins folder is
    "downloaded" (made up) there as <id>-<version>, as PluginUpdater does."""
    if not args:
        fail("Missing plugin command - usage: nextflow plugin install <pluginId,..>")
    if args[0] != "install":
        fail("Invalid plugin command: %s" % args[0])
    if len(args) != 2:
        fail("Missing plugin install target - usage: nextflow plugin install <pluginId,..>")
    home = os.environ.get("NXF_HOME") or os.path.join(os.path.expanduser("~"), ".nextflow")
    folder = os.environ.get("NXF_PLUGINS_DIR") or os.path.join(home, "plugins")
    for spec in filter(None, args[1].split(",")):
        name, _, version = spec.partition("@")
        version = version or PLUGIN_RELEASES.get(name)
        if not version:
            fail("Cannot find latest version of %s plugin" % name)
        target = os.path.join(folder, "%s-%s" % (name, version))
        if os.path.isdir(target):
            continue
        print("Downloading plugin %s@%s" % (name, version), flush=True)
        os.makedirs(os.path.join(target, "META-INF"))
        with open(os.path.join(target, "META-INF", "MANIFEST.MF"), "w") as f:
            f.write("Plugin-Id: %s\nPlugin-Version: %s\nPlugin-Provider: fake_nextflow stand-in\n" % (name, version))
    return 0


def main(argv):
    if argv[:1] in (["-v"], ["-version"]):
        print(version_text(argv[0] == "-version"))
        return 0
    if not argv or argv[0] not in ("run", "plugin"):
        print("ERROR ~ this stand-in only implements `nextflow run` and `nextflow plugin install`", file=sys.stderr)
        return 1
    try:
        if argv[0] == "plugin":
            return plugin_install(argv[1:])
        script, opts, cli_params = parse_run_args(argv[1:])
        params = config = None
        try:
            config = load_configs(opts.get("-c", []))
            params = load_params(opts.get("-params-file"), cli_params, script)
        finally:
            record(opts.get("-name", "unnamed"), argv, opts, params, config)
        if not os.path.isfile(script):
            fail("Cannot find script file: %s" % script)
        return Run(script, opts, params, config, argv).main()
    except Abort as e:
        print("ERROR ~ %s" % e, flush=True)
        print("", flush=True)
        print(" -- Check '.nextflow.log' file for details", flush=True)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # like System.exit: queued weblog posts not awaited are dropped

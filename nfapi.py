#!/usr/bin/env python3
"""nfapi: run Nextflow pipelines over HTTP, with nothing but the Python standard library.

    python3 nfapi.py --config example-config.json --data ./nfapi-data --host 127.0.0.1 --port 8000

A *workflow* is a named folder of input files plus a chosen pipeline and its arguments. Clients
create workflows, upload files, choose one of the pipelines configured by the operator, fill in its
arguments and schedule a *run*. A worker (nfapi_worker.py) claims queued runs over HTTP and starts
`nextflow run`; Nextflow reports every task back through its weblog to
`POST /api/workflows/<id>/nextflow-log`.

When a run ends, the server can POST a signed JSON webhook and send e-mail (`notify` in the
configuration); `POST .../runs/<run id>/relaunch` repeats a past run exactly. A pipeline may pin
its Nextflow version (`nextflow_version`, given to nextflow as NXF_VER).

Every request needs `Authorization: Bearer <token>`. The token comes from $NFAPI_TOKEN, else from
`<data>/api-token` (created on first start, mode 0600). Nextflow's weblog posts carry a per-run
secret instead, which works for that run only. Two routes need neither: the web page at `/`
(nfapi_ui.html beside this file; it holds no data) and short-lived download links. The worker never
sends the token: it signs each request with it (`Authorization: Nfapi-HMAC ...`), and uses only
answers the server signed (X-Nfapi-Proof): see Request.worker_mac_problem.
With `--unix-socket PATH` the server listens on a Unix socket as well, where requests from its
owner (the same uid) need no token unless a web page may have sent them (see Unix socket).

Data layout under --data (created 0700, files 0600):
    nfapi.sqlite3        workflows, runs, tasks and notifications (SQLite in WAL mode)
    api-token            the API token, unless $NFAPI_TOKEN is set
    lock                 held (flock) by the one server using this folder; its pid inside
    server.json          the running server's url, host, port and pid (removed when it stops)
    nfapi.sock           the Unix socket, when --unix-socket names it (removed when it stops)
    workflows/<id>/      the workflow's files: everything the file endpoints show
    launch/<id>/         where nextflow runs for this workflow (.nextflow/, work/, .nextflow.log)
    runs/<run id>/       params.json and console.log of one run
    tmp/                 uploads in progress and folders being deleted; emptied at start

Limits (configurable): JSON bodies up to `max_json_bytes` (1 MiB), uploads up to `max_upload_bytes`
(no limit by default), multipart part headers up to 16 KiB; a request head must arrive within
`header_timeout` seconds; a body may stall `client_timeout` seconds and must arrive within
`client_timeout` seconds plus 1 s per 16 KiB; at most `max_connections` requests are handled at
once (503 past that). A connection that has not sent a whole request head costs a descriptor, not a
thread: when descriptors run short, the ones that waited longest are closed. Every route and
answer is described by GET /api/openapi.json. `GET /api/workflows/<id>?wait=<seconds>` answers when
the latest run ends; nf-cloud's web UI follows runs live over Socket.IO (HTTP long-polling only)
at /socket.io/. Runs on Python 3.8+ and SQLite 3.24+.
"""

import argparse
import base64
import collections
import contextlib
import email.message
import email.utils
import errno
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import http
import http.client
import json
import math
import os
import queue
import re
import resource
import secrets
import select
import selectors
import shutil
import signal
import smtplib
import socket
import socketserver
import sqlite3
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.parse
import zipfile

# ==== Limits and constants ====

DEFAULTS = {
    "max_json_bytes": 1024 * 1024,
    "max_upload_bytes": None,
    "client_timeout": 60,
    "header_timeout": 15,
    "max_connections": 512,
    "lease_seconds": 60,
    "claim_confirm_seconds": 10,
    "weblog_grace_seconds": 60,
    "max_tasks_per_run": 1000 * 1000,
    "ping_interval": 25,
    "worker_absent_seconds": 30,
}
MAX_NAME_LENGTH = 512
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_FORM_FIELD_BYTES = 64 * 1024
FORM_FIELDS = ("directory",)  # the text fields of an upload, besides its one `file` part
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX of common filesystems
MAX_ARCHIVE_DEPTH = 200  # folders deeper than this are left out of archives (one descriptor per level)
READ_CHUNK = 256 * 1024
LINGER_SECONDS = 2.0
LOG_CHUNK_BYTES = 1024 * 1024
ARCHIVE_FORMATS = ("zip", "tar.gz")
ARG_TYPES = ("path", "paths", "file-glob", "number", "text", "boolean", "select")
ACTIVE_RUN_STATES = ("queued", "running")
FINAL_RUN_STATES = ("succeeded", "failed", "cancelled", "lost")
MAX_CLAIM_WAIT = 30
# Nextflow's biggest real weblog posts are a few KiB (`started` with 21.x's availableZoneIds: ~20 KiB).
MAX_WEBLOG_BYTES = 256 * 1024
MAX_WEBLOG_TEXT = 4096  # characters kept of a text a weblog post reports (a task's name, an errorMessage...)
MAX_TASK_ID = 2 ** 31 - 1  # Nextflow's TaskId is an int
TASKS_PAGE, MAX_TASKS_PAGE = 1000, 10000  # rows of a run's tasks or processes in one answer (page_bounds)
WEBLOG_CACHE_RUNS, WEBLOG_CACHE_SECONDS = 10000, 1.0  # see known_weblog_run
# The promises file (Database.promise) is emptied once it holds this much; a start keeps the
# promises in it PROMISE_BATCH a transaction.
PROMISES_KEPT_BYTES, PROMISE_BATCH = 1 << 20, 500
# The only session id nfapi ever puts after -resume: the canonical form of a Java UUID.
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_ANSWER_WAIT = 60  # `?wait=` on a run or a workflow
NEXTFLOW_UNKNOWN_EXIT = 2147483647  # Integer.MAX_VALUE: a task's exit code before it is known
# Nextflow's task states by progress: a late or repeated weblog post never moves a task back.
# CACHED comes from the trace file only (a resumed run's tasks that did not run again).
TASK_STATUS_RANK = {"NEW": 0, "SUBMITTED": 1, "RUNNING": 2, "COMPLETED": 3, "FAILED": 3, "ABORTED": 3, "CACHED": 3}
TEMP_PREFIX = ".nfapi-"
# A trace line is about 500 bytes: the cap holds a run of max_tasks_per_run tasks.
MAX_TRACE_BYTES, MAX_TRACE_LINE_BYTES = 1024 * 1024 * 1024, 64 * 1024
TRACE_BATCH = 10000  # trace rows written per write transaction, so that weblog posts never wait long
# A Nextflow version an operator pins (NXF_VER), e.g. 24.10.4 or 24.11.0-edge, as Nextflow's launcher accepts it.
PINNED_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?")
# What a `started` weblog post may record of what ran: a version, and a git commit (which a relaunch
# puts after -r: only hex digits, which cannot be read as an option).
REPORTED_VERSION = re.compile(r"[0-9A-Za-z.\-]{1,40}")
COMMIT_ID = re.compile(r"[0-9a-fA-F]{7,64}")
# One e-mail address, without a display name: nothing that could end a header or add a recipient.
EMAIL_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                           r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
MAX_NOTIFY_EMAILS = 20  # a workflow's own recipients
RETRY_AFTER_SECONDS = [30, 90, 180, 300]  # a notification is tried 5 times over 10 minutes
# A worker request (Request.worker_mac_problem): its time may be this far from ours, and its nonce is
# remembered for twice as long, which covers every moment its time is accepted.
WORKER_CLOCK_SKEW = 120
WORKER_MAC = re.compile(r"nonce=([0-9a-f]{32}), *time=([0-9]{1,12}), *mac=([0-9a-f]{64})")
MAX_WORKER_NONCES = 100 * 1000  # 400 worker requests a second


# ==== Errors ====

class ApiError(Exception):
    """An answer for the client: `status` and `{"errors": {field: [messages]}}`.

    Raised anywhere; `Connection.dispatch` is the one place that turns it into a response.
    """

    def __init__(self, status, field, message, headers=None):
        super().__init__(message)
        self.status = status
        self.errors = {field: [message]}
        self.headers = headers or {}

    @classmethod
    def of(cls, status, errors):
        err = cls(status, "general", "")
        err.errors = errors
        return err


class ClientGone(Exception):
    """The client closed the connection or stopped sending before its body was complete."""


class ConfigError(Exception):
    """A configuration problem, reported as `file: key.path: what is wrong`."""

    def __init__(self, where, message):
        super().__init__("%s: %s" % (".".join(where) or "(top level)", message))


# ==== Shares of what everyone shares ====
# The read-only token is for people trusted less than the owner. Of each pool that every client
# draws from (request slots, Socket.IO sessions, download links), its requests may hold at most
# half, so that the API token (the owner, and the worker's heartbeats and reports) always finds room.

def read_only_share(pool):
    return max(1, pool // 2)


class Share:
    """How many of one kind of request hold something at once, up to a limit."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0

    @contextlib.contextmanager
    def hold(self, limit):
        """Yield whether one more fits under `limit`; if it does, it is held until the block ends."""
        with self.lock:
            taken = self.held < limit
            self.held += taken
        try:
            yield taken
        finally:
            if taken:
                with self.lock:
                    self.held -= 1


# ==== Configuration ====

# Keys an argument may have besides type, desc and value: for every type, then by type.
COMMON_ARG_KEYS = {"required", "help_text", "group", "hidden"}
ARG_KEYS = {
    "path": {"selectable_files", "selectable_folders", "exists", "pattern"},
    "paths": {"selectable_files", "selectable_folders", "exists", "pattern"},
    "file-glob": set(),
    "number": {"integer", "minimum", "maximum"},
    "text": {"is_multiline", "pattern", "min_length", "max_length"},
    "boolean": set(),
    "select": {"options"},
}
# nextflow_schema.json `format` of a string parameter -> (argument type, files selectable, folders selectable)
SCHEMA_FORMATS = {
    "file-path": ("path", True, False),
    "directory-path": ("path", False, True),
    "path": ("path", True, True),
    "file-path-pattern": ("file-glob", None, None),
}


def load_config(path):
    """Read and check the JSON configuration; raise ConfigError naming the key that is wrong."""
    raw = read_json_file(path, [], named=False)
    expect(raw, dict, [], "an object")
    known = set(DEFAULTS) | {"nextflow_workflows", "cors_origins", "notify"}
    for key in raw:
        if key not in known:
            raise ConfigError([key], "unknown setting (known: %s)" % ", ".join(sorted(known)))
    config = dict(DEFAULTS)
    config.update({k: v for k, v in raw.items() if k in DEFAULTS})
    for key in DEFAULTS:
        value = config[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError([key], "must be a positive integer%s" % (" or null" if key == "max_upload_bytes" else ""))
    origins = raw.get("cors_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) and re.fullmatch(r"https?://[^/\s]+", o) for o in origins):
        raise ConfigError(["cors_origins"], "must be a list of origins such as http://localhost:3000")
    config["cors_origins"] = origins
    base = os.path.dirname(os.path.abspath(path))
    pipelines = raw.get("nextflow_workflows")
    expect(pipelines, dict, ["nextflow_workflows"], "an object of pipelines by name")
    config["pipelines"] = {name: load_pipeline(spec, base, ["nextflow_workflows", name])
                           for name, spec in pipelines.items()}
    config["notify"] = load_notify(raw.get("notify", {}))
    return config


def read_json_file(path, where, named):
    """A configuration file's JSON; `named` puts its path in the message (for files it refers to)."""
    label = path if named else "the file"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(where, "cannot read %s: %s" % (label, e.strerror))
    except ValueError as e:
        raise ConfigError(where, "%s is not valid JSON: %s" % (label, e))


def expect(value, kind, where, description):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(where, "must be %s" % description)


def load_pipeline(spec, base, where):
    expect(spec, dict, where, "an object")
    known = {"directory", "script", "pipeline", "revision", "nextflow_version", "nextflow_parameters", "args", "schema",
             "include_hidden"}
    for key in spec:
        if key not in known:
            raise ConfigError(where + [key], "unknown key (known: %s)" % ", ".join(sorted(known)))
    pipeline = {}
    if "pipeline" in spec:
        if "directory" in spec or "script" in spec:
            raise ConfigError(where, "give either `pipeline` or `directory` + `script`, not both")
        expect(spec["pipeline"], str, where + ["pipeline"], "a pipeline name such as nf-core/demo")
        pipeline["pipeline"] = spec["pipeline"]
        if "revision" in spec:
            expect(spec["revision"], str, where + ["revision"], "a string")
            pipeline["revision"] = spec["revision"]
    else:
        for key in ("directory", "script"):
            if key not in spec:
                raise ConfigError(where, "needs `directory` and `script`, or a remote `pipeline`")
            expect(spec[key], str, where + [key], "a string")
        directory = os.path.normpath(os.path.join(base, spec["directory"]))
        script = os.path.join(directory, spec["script"])
        if not os.path.isfile(script):
            raise ConfigError(where + ["script"], "no such file: %s" % script)
        pipeline.update(directory=directory, script=script)
    if "nextflow_version" in spec:
        version = spec["nextflow_version"]
        if not isinstance(version, str) or not PINNED_VERSION.fullmatch(version):
            raise ConfigError(where + ["nextflow_version"], "must be a Nextflow version such as 24.10.4")
        pipeline["nextflow_version"] = version
    params = spec.get("nextflow_parameters", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise ConfigError(where + ["nextflow_parameters"], "must be a list of strings")
    pipeline["nextflow_parameters"] = params
    args = spec.get("args", {})
    expect(args, dict, where + ["args"], "an object with `dynamic` and `static`")
    for key in args:
        if key not in ("dynamic", "static"):
            raise ConfigError(where + ["args", key], "unknown key (known: dynamic, static)")
    for kind in ("dynamic", "static"):
        group = args.get(kind, {})
        expect(group, dict, where + ["args", kind], "an object of arguments by name")
        pipeline[kind] = {name: load_argument(arg, where + ["args", kind, name], kind == "static")
                          for name, arg in group.items()}
    schema = pipeline_schema_path(spec, pipeline, base, where)
    if schema:
        include_hidden = spec.get("include_hidden", False)
        expect(include_hidden, bool, where + ["include_hidden"], "true or false")
        from_schema = load_schema(schema, where, include_hidden)
        # The configuration overrides or extends the schema; a static argument is not asked for.
        pipeline["dynamic"] = dict(from_schema, **pipeline["dynamic"])
        for name in pipeline["static"]:
            pipeline["dynamic"].pop(name, None)
        pipeline["schema"] = schema
    return pipeline


def pipeline_schema_path(spec, pipeline, base, where):
    """`schema` relative to the pipeline's folder (or the config's, for a remote pipeline); else a
    nextflow_schema.json beside a local pipeline's script."""
    folder = pipeline.get("directory", base)
    if "schema" in spec:
        expect(spec["schema"], str, where + ["schema"], "a path to a nextflow_schema.json")
        path = os.path.join(folder, spec["schema"])
        if not os.path.isfile(path):
            raise ConfigError(where + ["schema"], "no such file: %s" % path)
        return path
    found = os.path.join(folder, "nextflow_schema.json")
    return found if "directory" in pipeline and os.path.isfile(found) else None


def load_argument(arg, where, needs_value):
    """An argument as configured: its definition with defaults filled in, checked key by key."""
    expect(arg, dict, where, "an object with `type`")
    kind = arg.get("type")
    if kind not in ARG_TYPES:
        raise ConfigError(where + ["type"], "must be one of %s" % ", ".join(ARG_TYPES))
    known = {"type", "desc", "value"} | COMMON_ARG_KEYS | ARG_KEYS[kind]
    for key in arg:
        if key not in known:
            raise ConfigError(where + [key], "unknown key for a %s argument (known: %s)" % (kind, ", ".join(sorted(known))))
    definition = {"type": kind, "desc": arg.get("desc", ""), "value": arg.get("value"), "required": True}
    if kind in ("path", "paths"):
        definition.update(selectable_files=True, selectable_folders=False, exists=True)
    definition.update((key, arg[key]) for key in known if key in arg and key not in ("type", "desc", "value"))
    return check_definition(definition, where, needs_value)


def check_definition(definition, where, needs_value=False):
    kinds = {"required": bool, "hidden": bool, "help_text": str, "group": str, "selectable_files": bool,
             "selectable_folders": bool, "exists": bool, "is_multiline": bool, "integer": bool, "options": list,
             "pattern": str, "minimum": (int, float), "maximum": (int, float), "min_length": int, "max_length": int}
    for key, kind in kinds.items():
        if key in definition and (not isinstance(definition[key], kind) or isinstance(definition[key], bool) and kind is not bool):
            raise ConfigError(where + [key], "has the wrong type")
    if definition["type"] == "select" and not definition.get("options"):
        raise ConfigError(where + ["options"], "a select argument needs a list of options")
    if "pattern" in definition:
        try:
            re.compile(definition["pattern"])
        except re.error as e:
            raise ConfigError(where + ["pattern"], "not a valid regular expression: %s" % e)
    problem = argument_value_problem(definition, definition["value"])
    if problem:
        raise ConfigError(where + ["value"], problem)
    if needs_value and is_empty(definition["value"]):
        raise ConfigError(where + ["value"], "a static argument needs a value")
    return definition


def is_empty(value):
    return value is None or value == "" or value == []


def argument_value_problem(definition, value):
    """Why `value` cannot be stored for this argument, or None. Empty values are allowed in a draft."""
    if is_empty(value):
        return None
    kind = definition["type"]
    if kind == "number":
        return number_problem(definition, value)
    if kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "select":
        return None if value in definition["options"] and not isinstance(value, (list, dict)) else \
            "must be one of %s" % ", ".join(json.dumps(o) for o in definition["options"])
    if kind == "paths":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return "must be a list of paths"
        # The pipeline gets them joined by commas and splits them there (param_value): a comma in a
        # name would hand it two paths, the second one anywhere ("a,/etc/passwd").
        if any("," in v for v in value):
            return "a path in a list must not contain a comma (the pipeline gets the list joined by commas)"
        return next(filter(None, (string_problem(definition, v) for v in value)), None)
    if not isinstance(value, str):
        return "must be a string"
    return string_problem(definition, value)


def number_problem(definition, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a number"
    if definition.get("integer") and not isinstance(value, int):
        return "must be a whole number"
    if "minimum" in definition and value < definition["minimum"]:
        return "must be at least %s" % definition["minimum"]
    if "maximum" in definition and value > definition["maximum"]:
        return "must be at most %s" % definition["maximum"]
    return None


def string_problem(definition, value):
    if definition["type"] in ("path", "paths", "file-glob"):
        problem = relative_path_problem(value)
        if problem:
            return problem
    if "pattern" in definition and not re.search(definition["pattern"], value):
        return "must match the pattern %s" % definition["pattern"]
    if len(value) < definition.get("min_length", 0):
        return "must be at least %d characters" % definition["min_length"]
    if len(value) > definition.get("max_length", len(value)):
        return "must be at most %d characters" % definition["max_length"]
    return None


def load_notify(raw):
    """`notify`: where the server reports each run that ends (see Webhooks and e-mail)."""
    where = ["notify"]
    expect(raw, dict, where, "an object with `webhooks` and/or `email`")
    known = ("webhooks", "email", "retry_after_seconds")
    for key in raw:
        if key not in known:
            raise ConfigError(where + [key], "unknown key (known: %s)" % ", ".join(known))
    hooks = raw.get("webhooks", [])
    expect(hooks, list, where + ["webhooks"], "a list of {\"url\": ..., \"secret\": ...}")
    webhooks = [load_webhook(hook, where + ["webhooks", str(i)]) for i, hook in enumerate(hooks)]
    urls = [hook["url"] for hook in webhooks]
    if len(set(urls)) < len(urls):
        raise ConfigError(where + ["webhooks"], "lists a URL twice")
    retry = raw.get("retry_after_seconds", RETRY_AFTER_SECONDS)
    if not isinstance(retry, list) or not 0 < len(retry) <= 20 or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 86400 for s in retry):
        raise ConfigError(where + ["retry_after_seconds"], "must be a list of 1 to 20 waits in seconds (each "
                                                           "up to 86400) between the tries of a notification")
    mail = raw.get("email")
    return {"webhooks": webhooks, "email": None if mail is None else load_email(mail, where + ["email"]),
            "retry_after_seconds": retry}


def load_webhook(hook, where):
    expect(hook, dict, where, "an object with `url` and `secret`")
    for key in hook:
        if key not in ("url", "secret"):
            raise ConfigError(where + [key], "unknown key (known: url, secret)")
    url = hook.get("url")
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^/?#@\x00-\x20\x7f]+([/?][^\x00-\x20\x7f]*)?", url) or \
            not urllib.parse.urlsplit(url).hostname:
        raise ConfigError(where + ["url"], "must be an http:// or https:// URL")
    secret = hook.get("secret")
    if not isinstance(secret, str) or not secret:
        raise ConfigError(where + ["secret"], "must be a string: the key of each notification's HMAC-SHA256 "
                                              "signature (X-Nfapi-Signature), so the receiver can check it")
    return {"url": url, "secret": secret}


def load_email(mail, where):
    expect(mail, dict, where, "an object with `smtp` or `sendmail`, `from` and `to`")
    for key in mail:
        if key not in ("smtp", "sendmail", "from", "to"):
            raise ConfigError(where + [key], "unknown key (known: smtp, sendmail, from, to)")
    if ("smtp" in mail) == ("sendmail" in mail):
        raise ConfigError(where, "give either `smtp` (\"host:port\") or `sendmail` (its path), not both")
    if "smtp" in mail:
        m = isinstance(mail["smtp"], str) and re.fullmatch(r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})",
                                                           mail["smtp"])
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(where + ["smtp"], "must be \"host:port\", such as \"localhost:25\"")
    else:
        path = mail["sendmail"]
        if not isinstance(path, str) or not os.path.isabs(path) or not os.access(path, os.X_OK):
            raise ConfigError(where + ["sendmail"], "must be the absolute path of a sendmail program, "
                                                    "such as /usr/sbin/sendmail")
    if not is_email_address(mail.get("from")):
        raise ConfigError(where + ["from"], "must be an e-mail address such as nfapi@example.org")
    recipients = mail.get("to", [])
    if not isinstance(recipients, list) or not all(is_email_address(r) for r in recipients):
        raise ConfigError(where + ["to"], "must be a list of e-mail addresses such as team@example.org")
    return dict(mail, to=recipients)


def is_email_address(value):
    return isinstance(value, str) and len(value) <= 254 and EMAIL_ADDRESS.fullmatch(value) is not None


# ==== nextflow_schema.json ====

def load_schema(path, where, include_hidden):
    """The dynamic arguments a nextflow_schema.json describes (nf-schema 2020-12 `$defs` or
    nf-validation draft-07 `definitions`, groups brought in by `allOf`, plus top-level `properties`)."""
    where = where + ["schema"]
    schema = read_json_file(path, where, named=True)
    expect(schema, dict, where, "a JSON object (%s)" % path)
    arguments = {}
    for group_title, properties, required in schema_groups(schema, where):
        for name, prop in properties.items():
            definition = schema_argument(prop, group_title, name in required, where + [name])
            if definition and (include_hidden or not definition.get("hidden")):
                arguments[name] = definition
    return arguments


def schema_groups(schema, where):
    """(group title, properties, required names) in the schema's order."""
    defs_key = "$defs" if "$defs" in schema else "definitions"
    defs = schema.get(defs_key, {})
    expect(defs, dict, where + [defs_key], "an object of groups")
    refs = [item.get("$ref") if isinstance(item, dict) else None for item in schema.get("allOf", [])]
    names = [ref.split("/")[-1] for ref in refs if isinstance(ref, str)] if refs else list(defs)
    groups = []
    for name in names:
        group = defs.get(name)
        if not isinstance(group, dict):
            raise ConfigError(where + ["allOf"], "refers to a group %r that is not in %s" % (name, defs_key))
        groups.append((group.get("title", name), group.get("properties", {}), group.get("required", [])))
    groups.append((None, schema.get("properties", {}), schema.get("required", [])))
    for title, properties, required in groups:
        expect(properties, dict, where + ["properties"], "an object")
        expect(required, list, where + ["required"], "a list")
    return groups


def schema_argument(prop, group, required, where):
    """One schema parameter as an argument definition; None for types a form cannot hold (object, array)."""
    expect(prop, dict, where, "an object")
    kind, fmt = prop.get("type", "string"), prop.get("format")
    definition = {"desc": prop.get("description", ""), "required": required}
    if "enum" in prop:
        expect(prop["enum"], list, where + ["enum"], "a list")
        definition.update(type="select", options=prop["enum"])
    elif kind == "boolean":
        definition["type"] = "boolean"
    elif kind in ("integer", "number"):
        definition.update(type="number", integer=kind == "integer")
        definition.update((key, prop[key]) for key in ("minimum", "maximum") if key in prop)
    elif kind == "string" and fmt in SCHEMA_FORMATS:
        arg_type, files, folders = SCHEMA_FORMATS[fmt]
        definition["type"] = arg_type
        if arg_type == "path":
            definition.update(selectable_files=files, selectable_folders=folders, exists=prop.get("exists") is True)
    elif kind == "string":
        definition.update(type="text", is_multiline=False)
        definition.update((new, prop[old]) for old, new in (("minLength", "min_length"), ("maxLength", "max_length"))
                          if old in prop)
    else:
        return None
    if "pattern" in prop and definition["type"] in ("path", "text"):
        definition["pattern"] = prop["pattern"]
    definition.update((key, prop[key]) for key in ("help_text", "hidden") if key in prop)
    if group:
        definition["group"] = group
    # A default that is not a value of the argument (an s3:// or absolute path, say) stays the
    # pipeline's own: nfapi leaves the parameter out of the params file.
    definition["value"] = prop.get("default")
    if argument_value_problem(definition, definition["value"]):
        definition["value"] = None
    return check_definition(definition, where)


# ==== Database ====

MIGRATIONS = [
    """
    CREATE TABLE workflows (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        nextflow_workflow TEXT NOT NULL DEFAULT '',
        nextflow_arguments TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        workflow_id INTEGER NOT NULL REFERENCES workflows(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        pipeline TEXT NOT NULL,
        arguments TEXT NOT NULL,
        resume INTEGER NOT NULL DEFAULT 0,
        secret TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        error_message TEXT,
        submitted INTEGER NOT NULL DEFAULT 0,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_by_workflow ON runs(workflow_id, id);
    CREATE UNIQUE INDEX one_active_run_per_workflow ON runs(workflow_id)
        WHERE status IN ('queued', 'running');
    """,
    """
    ALTER TABLE runs ADD COLUMN worker TEXT;
    ALTER TABLE runs ADD COLUMN lease_until REAL;
    ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN command TEXT;
    ALTER TABLE runs ADD COLUMN nextflow_run_name TEXT;
    ALTER TABLE runs ADD COLUMN session_id TEXT;
    ALTER TABLE runs ADD COLUMN nextflow_success INTEGER;
    ALTER TABLE runs ADD COLUMN nextflow_error TEXT;
    ALTER TABLE runs ADD COLUMN cached INTEGER;
    ALTER TABLE runs ADD COLUMN params TEXT;
    ALTER TABLE runs ADD COLUMN resume_session TEXT;
    CREATE INDEX runs_by_status ON runs(status, id);
    CREATE TABLE tasks (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        task_id INTEGER NOT NULL,
        name TEXT,
        process TEXT,
        tag TEXT,
        status TEXT NOT NULL,
        exit INTEGER,
        submit INTEGER,
        start INTEGER,
        complete INTEGER,
        attempt INTEGER,
        workdir TEXT,
        PRIMARY KEY (run_id, task_id)
    ) WITHOUT ROWID;
    """,
    # A run's task counters follow its tasks in the same statement, whoever writes them.
    """
    CREATE TRIGGER tasks_counted AFTER INSERT ON tasks BEGIN
        UPDATE runs SET submitted = submitted + 1, completed = completed + (NEW.status = 'COMPLETED'),
                        failed = failed + (NEW.status IN ('FAILED', 'ABORTED'))
        WHERE id = NEW.run_id;
    END;
    CREATE TRIGGER tasks_recounted AFTER UPDATE OF status ON tasks BEGIN
        UPDATE runs SET completed = completed + (NEW.status = 'COMPLETED') - (OLD.status = 'COMPLETED'),
                        failed = failed + (NEW.status IN ('FAILED', 'ABORTED')) - (OLD.status IN ('FAILED', 'ABORTED'))
        WHERE id = NEW.run_id;
    END;
    """,
    # Who holds a run (claim_secret, confirmed_at), what the worker said and when (console_tail,
    # late_report), and whether tasks were left out (tasks_truncated). Runs that were running before
    # count as confirmed; a session id that is not a UUID (a forged weblog post) is forgotten.
    """
    ALTER TABLE runs ADD COLUMN claim_secret TEXT;
    ALTER TABLE runs ADD COLUMN confirmed_at REAL;
    ALTER TABLE runs ADD COLUMN console_tail TEXT;
    ALTER TABLE runs ADD COLUMN late_report TEXT;
    ALTER TABLE runs ADD COLUMN tasks_truncated INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET confirmed_at = started_at WHERE status = 'running';
    UPDATE runs SET session_id = NULL WHERE session_id NOT GLOB '%s';
    """ % "-".join("[0-9a-f]" * n for n in (8, 4, 4, 4, 12)),
    # What a run asked for (revision, pinned_nextflow_version: a relaunch repeats them) and what ran
    # (nextflow_version, commit_id); a workflow's own e-mail recipients; and the notifications sent
    # when a run ends, one row per run and channel, so that a restart neither loses nor repeats one.
    """
    ALTER TABLE runs ADD COLUMN revision TEXT;
    ALTER TABLE runs ADD COLUMN pinned_nextflow_version TEXT;
    ALTER TABLE runs ADD COLUMN nextflow_version TEXT;
    ALTER TABLE runs ADD COLUMN commit_id TEXT;
    ALTER TABLE workflows ADD COLUMN notify_email TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        channel TEXT NOT NULL,
        target TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT,
        sent_at REAL,
        UNIQUE (run_id, channel, target)
    );
    CREATE INDEX deliveries_due ON deliveries(next_at) WHERE status = 'pending';
    """,
    # What a user looks at when a run goes wrong or is slow (issue 13): each task's metrics under
    # Nextflow's names (TASK_FIELDS), the tail of a failed task's .command.err and the run's first
    # failed tasks (remember_failed_tasks), per-process counters that triggers keep, as they keep the
    # run's, with the indexes the processes view takes its medians from, and the workers seen.
    # A CACHED task (the trace file reports them, the weblog never does) counts as done, as
    # Nextflow's console counts it: a resumed run ends at "n of n".
    """
    ALTER TABLE tasks ADD COLUMN hash TEXT;
    ALTER TABLE tasks ADD COLUMN native_id TEXT;
    ALTER TABLE tasks ADD COLUMN duration INTEGER;
    ALTER TABLE tasks ADD COLUMN realtime INTEGER;
    ALTER TABLE tasks ADD COLUMN pcpu REAL;
    ALTER TABLE tasks ADD COLUMN pmem REAL;
    ALTER TABLE tasks ADD COLUMN peak_rss INTEGER;
    ALTER TABLE tasks ADD COLUMN peak_vmem INTEGER;
    ALTER TABLE tasks ADD COLUMN rchar INTEGER;
    ALTER TABLE tasks ADD COLUMN wchar INTEGER;
    ALTER TABLE tasks ADD COLUMN read_bytes INTEGER;
    ALTER TABLE tasks ADD COLUMN write_bytes INTEGER;
    ALTER TABLE tasks ADD COLUMN cpus INTEGER;
    ALTER TABLE tasks ADD COLUMN memory INTEGER;
    ALTER TABLE tasks ADD COLUMN time INTEGER;
    ALTER TABLE tasks ADD COLUMN disk INTEGER;
    ALTER TABLE tasks ADD COLUMN queue TEXT;
    ALTER TABLE tasks ADD COLUMN container TEXT;
    ALTER TABLE tasks ADD COLUMN hostname TEXT;
    ALTER TABLE tasks ADD COLUMN error_action TEXT;
    ALTER TABLE tasks ADD COLUMN command_err TEXT;
    UPDATE tasks SET duration = complete - submit WHERE complete > 0 AND submit > 0;
    ALTER TABLE runs ADD COLUMN failed_tasks TEXT;
    CREATE INDEX tasks_failed ON tasks(run_id, task_id) WHERE status = 'FAILED';
    CREATE INDEX tasks_by_realtime ON tasks(run_id, process, realtime) WHERE realtime IS NOT NULL;
    CREATE INDEX tasks_by_peak_rss ON tasks(run_id, process, peak_rss) WHERE peak_rss IS NOT NULL;
    CREATE TABLE processes (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        process TEXT NOT NULL,
        submitted INTEGER NOT NULL DEFAULT 0,
        running INTEGER NOT NULL DEFAULT 0,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        cached INTEGER NOT NULL DEFAULT 0,
        aborted INTEGER NOT NULL DEFAULT 0,
        realtimes INTEGER NOT NULL DEFAULT 0,
        peak_rsses INTEGER NOT NULL DEFAULT 0,
        UNIQUE (run_id, process)
    );
    INSERT INTO processes (run_id, process, submitted, running, completed, failed, aborted)
        SELECT run_id, process, count(*), sum(status = 'RUNNING'), sum(status = 'COMPLETED'),
               sum(status = 'FAILED'), sum(status = 'ABORTED')
        FROM tasks WHERE process IS NOT NULL GROUP BY run_id, process ORDER BY run_id, min(task_id);
    CREATE TRIGGER tasks_by_process AFTER INSERT ON tasks WHEN NEW.process IS NOT NULL BEGIN
        %(enter)s
    END;
    CREATE TRIGGER tasks_recounted_in_process AFTER UPDATE OF status, realtime, peak_rss ON tasks
    WHEN NEW.process IS OLD.process AND NEW.process IS NOT NULL AND (OLD.status IS NOT NEW.status
         OR (OLD.realtime IS NULL) != (NEW.realtime IS NULL) OR (OLD.peak_rss IS NULL) != (NEW.peak_rss IS NULL)) BEGIN
        UPDATE processes SET running = running + (NEW.status = 'RUNNING') - (OLD.status = 'RUNNING'),
            completed = completed + (NEW.status = 'COMPLETED') - (OLD.status = 'COMPLETED'),
            failed = failed + (NEW.status = 'FAILED') - (OLD.status = 'FAILED'),
            cached = cached + (NEW.status = 'CACHED') - (OLD.status = 'CACHED'),
            aborted = aborted + (NEW.status = 'ABORTED') - (OLD.status = 'ABORTED'),
            realtimes = realtimes + (NEW.realtime IS NOT NULL) - (OLD.realtime IS NOT NULL),
            peak_rsses = peak_rsses + (NEW.peak_rss IS NOT NULL) - (OLD.peak_rss IS NOT NULL)
        WHERE run_id = NEW.run_id AND process = NEW.process;
    END;
    CREATE TRIGGER tasks_left_process AFTER UPDATE OF process ON tasks
    WHEN OLD.process IS NOT NEW.process AND OLD.process IS NOT NULL BEGIN
        UPDATE processes SET submitted = submitted - 1, running = running - (OLD.status = 'RUNNING'),
            completed = completed - (OLD.status = 'COMPLETED'), failed = failed - (OLD.status = 'FAILED'),
            cached = cached - (OLD.status = 'CACHED'), aborted = aborted - (OLD.status = 'ABORTED'),
            realtimes = realtimes - (OLD.realtime IS NOT NULL), peak_rsses = peak_rsses - (OLD.peak_rss IS NOT NULL)
        WHERE run_id = OLD.run_id AND process = OLD.process;
    END;
    CREATE TRIGGER tasks_entered_process AFTER UPDATE OF process ON tasks
    WHEN OLD.process IS NOT NEW.process AND NEW.process IS NOT NULL BEGIN
        %(enter)s
    END;
    DROP TRIGGER tasks_counted;
    DROP TRIGGER tasks_recounted;
    CREATE TRIGGER tasks_counted AFTER INSERT ON tasks BEGIN
        UPDATE runs SET submitted = submitted + 1, completed = completed + (NEW.status IN ('COMPLETED', 'CACHED')),
                        failed = failed + (NEW.status IN ('FAILED', 'ABORTED'))
        WHERE id = NEW.run_id;
    END;
    CREATE TRIGGER tasks_recounted AFTER UPDATE OF status ON tasks BEGIN
        UPDATE runs SET completed = completed + (NEW.status IN ('COMPLETED', 'CACHED'))
                                              - (OLD.status IN ('COMPLETED', 'CACHED')),
                        failed = failed + (NEW.status IN ('FAILED', 'ABORTED')) - (OLD.status IN ('FAILED', 'ABORTED'))
        WHERE id = NEW.run_id;
    END;
    CREATE TABLE workers (
        name TEXT PRIMARY KEY,
        host TEXT,
        pid INTEGER,
        slots INTEGER,
        nextflow_version TEXT,
        last_seen REAL NOT NULL
    );
    """ % {
        # A task counts in its process's row (a row per process, in the order first seen).
        "enter": """INSERT INTO processes (run_id, process, submitted, running, completed, failed, cached, aborted,
                               realtimes, peak_rsses)
        VALUES (NEW.run_id, NEW.process, 1, NEW.status = 'RUNNING', NEW.status = 'COMPLETED', NEW.status = 'FAILED',
                NEW.status = 'CACHED', NEW.status = 'ABORTED', NEW.realtime IS NOT NULL, NEW.peak_rss IS NOT NULL)
        ON CONFLICT (run_id, process) DO UPDATE SET
            submitted = submitted + 1, running = running + excluded.running, completed = completed + excluded.completed,
            failed = failed + excluded.failed, cached = cached + excluded.cached, aborted = aborted + excluded.aborted,
            realtimes = realtimes + excluded.realtimes, peak_rsses = peak_rsses + excluded.peak_rsses;"""},
]


def connect(path):
    """Open a connection with every per-connection setting; transactions are explicit (Database.write)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class Database:
    """Reads use a pool of connections: a request takes one, uses it alone, and gives it back.
    Writes go through one connection, one transaction at a time (see write)."""

    def __init__(self, path):
        self.path = path
        self.idle = []  # list.pop and list.append are atomic: no lock needed
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.writer = connect(path)
        self.write_lock = threading.Lock()
        self.queued = collections.deque()  # work for write_together; append and popleft are atomic
        self.promises = threading.Condition(threading.Lock())
        self.promised = self.kept = 0  # promises made and kept so far (one is open at a time)
        self.broken = False  # a promised write failed: its entry waits in the file for the next start
        self.promises_fd = os.open(path + "-promised", os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   0o600)
        self.promises_bytes = os.fstat(self.promises_fd).st_size
        mode = self.writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            sys.exit("nfapi: SQLite refused WAL mode for %s (journal_mode=%s). The data folder is "
                     "probably on a network filesystem (NFS, GPFS, Lustre); put --data on a local disk."
                     % (path, mode))
        migrate(self)

    @contextlib.contextmanager
    def connection(self):
        self.wait_for_promises()
        try:
            conn = self.idle.pop()
        except IndexError:
            conn = connect(self.path)
        try:
            yield conn
        finally:
            self.idle.append(conn)

    @contextlib.contextmanager
    def write(self):
        """The one write transaction. BEGIN IMMEDIATE takes SQLite's write lock up front, so a
        read-then-write never fails half-way with "database is locked".

        SQLite admits one writer at a time, and a connection that finds the lock taken sleeps in
        its busy handler (1, 2, 5, 10... ms): threads of this process queue on write_lock instead
        (the busy timeout is left for other processes). They share one connection, whose page
        cache stays valid from one write to the next; each pooled connection would re-read the
        pages another one changed.
        """
        self.wait_for_promises()  # before write_lock: a promised write needs it
        with self.write_lock, self.transaction() as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self):
        """A transaction on the writing connection; the caller holds write_lock."""
        conn = self.writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    # -- writes answered before they are made --

    @contextlib.contextmanager
    def promise(self, entry):
        """Around writes made after their request was answered (Request.answer_first); yields whether
        they may be. `entry` (bytes) says what they are: it is appended to the promises file first,
        one write() where a commit writes six pages and takes three locks, so a killed server makes
        them at its next start (keep_old_promises).

        Only a write that comes alone is promised: one that comes while another write is in progress
        shares its commit (write_together) and waits for it. So one promise is open at a time (the
        wait below counts on it), and the file is emptied once it holds PROMISES_KEPT_BYTES of kept
        ones. Nothing is promised either when the file cannot take the entry (a full disk), nor after
        a promised write failed (an error after the answer): the file keeps that entry for the next start.

        Until the writes are made, connection() and write() wait: no request that starts after an
        answer reads less than the answer told. So a thread must not call them while its own
        promise is open."""
        framed = b"%d\n%s" % (len(entry), entry)
        with self.promises:
            alone = self.kept == self.promised and not self.write_lock.locked() and not self.queued
            promised = alone and not self.broken and self.append_promise(framed)
            if promised:
                self.promised += 1
        if not promised:
            yield False
            return
        try:
            yield True
        except Exception:
            self.broken = True
            raise
        finally:
            with self.promises:
                self.kept += 1
                if self.promises_bytes > PROMISES_KEPT_BYTES and not self.broken:
                    os.ftruncate(self.promises_fd, 0)  # every promise in it is kept
                    self.promises_bytes = 0
                self.promises.notify_all()

    def append_promise(self, framed):
        """Whether `framed` is now whole at the end of the promises file (a full disk leaves no part of it)."""
        try:
            whole = os.write(self.promises_fd, framed) == len(framed)
        except OSError:
            whole = False
        if whole:
            self.promises_bytes += len(framed)
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(self.promises_fd, self.promises_bytes)
        return whole

    def wait_for_promises(self):
        if self.kept != self.promised:  # without the lock: a promise made after this test came after the caller
            with self.promises:
                made = self.promised
                self.promises.wait_for(lambda: self.kept >= made)

    def keep_old_promises(self, make):
        """At start, before any request: make(conn, entry) for each entry of the promises file, in
        PROMISE_BATCH entries a transaction, then empty it. The file may hold promises kept already:
        `make` must be idempotent. An entry cut short by a crash was never answered, and is left out.
        So is one `make` fails on (the file is not synced: a power cut may damage it), with what it
        wrote, and it is logged: the start goes on. A database error stops the start, the file kept."""
        with open(os.dup(self.promises_fd), "rb") as f:
            f.seek(0)
            entries = list(read_promises(f.read()))
        for start in range(0, len(entries), PROMISE_BATCH):
            with self.write() as conn:
                for entry in entries[start:start + PROMISE_BATCH]:
                    keep_old_promise(conn, make, entry)
        os.ftruncate(self.promises_fd, 0)
        self.promises_bytes = 0

    def write_together(self, work):
        """Return work(conn), run in a write transaction shared with the work other threads queued
        meanwhile (group commit). The thread that gets the write lock runs everything queued, so
        under load one BEGIN, one COMMIT and one write of each changed page serve many small
        writes. `work` reports problems in its result: an exception fails the shared transaction,
        and each work is then run again alone, so one failure fails only its own request.
        """
        mine = {"work": work}
        self.queued.append(mine)
        with self.write_lock:
            if "done" not in mine:
                batch = [self.queued.popleft() for _ in range(len(self.queued))]
                try:
                    with self.transaction() as conn:
                        for item in batch:
                            item["result"] = item["work"](conn)
                except Exception:
                    for item in batch:
                        try:
                            with self.transaction() as conn:
                                item["result"] = item["work"](conn)
                        except Exception as e:
                            item["error"] = e
                for item in batch:
                    item["done"] = True
        if "error" in mine:
            raise mine["error"]
        return mine["result"]

    def close(self):
        for conn in self.idle + [self.writer]:
            conn.close()
        with self.promises:
            if self.kept == self.promised:  # every promise is kept: the next start has nothing to do
                os.ftruncate(self.promises_fd, 0)
            os.close(self.promises_fd)


PROMISE_LENGTH = re.compile(rb"([0-9]{1,18})\n")


def read_promises(data):
    """The entries of a promises file's `data` (see Database.promise), up to its end or to an entry
    cut short."""
    end = 0
    while True:
        length = PROMISE_LENGTH.match(data, end)
        if not length or length.end() + int(length.group(1)) > len(data):
            return
        end = length.end() + int(length.group(1))
        yield data[length.end():end]


def keep_old_promise(conn, make, entry):
    """make(conn, entry) in a savepoint of the caller's transaction; see Database.keep_old_promises."""
    conn.execute("SAVEPOINT promise")
    try:
        make(conn, entry)
    except sqlite3.Error:
        raise
    except Exception:
        conn.execute("ROLLBACK TO promise")
        sys.stderr.write("nfapi: left out an entry of the promises file that could not be kept:\n%s"
                         % traceback.format_exc())
    conn.execute("RELEASE promise")


def migrate(db):
    """Apply pending MIGRATIONS, each with its user_version bump in one transaction."""
    while True:
        with db.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= len(MIGRATIONS):
                return
            for statement in sql_statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = %d" % (version + 1))


def sql_statements(script):
    """The statements of a script, each whole (a trigger's body has semicolons of its own)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


# ==== Notifications ====

QUEUED_RUNS = "queued runs"  # the key of the run queue; a workflow's key is its id


class Changes:
    """The one place where the server says that something changed, and where threads wait for it
    (claims, `?wait=`, Socket.IO polls) instead of polling the database.

    Every change bumps one generation counter and records it for its keys. A waiter notes the
    generation before it reads the database, then sleeps on one condition until one of its keys
    changed after that: a change between its read and its sleep is not missed. So notify() must
    come after the change is committed. It wakes threads only when one waits on one of its keys:
    on the weblog's hot path it costs a lock and a few dictionary operations.
    """

    def __init__(self):
        self.condition = threading.Condition(threading.Lock())
        self.generation = 0
        self.changed_at = {}  # key -> generation of its last change
        self.waiting = collections.Counter()  # key -> threads waiting for it
        self.closed = False

    def notify(self, *keys):
        with self.condition:
            self.generation += 1
            for key in keys:
                self.changed_at[key] = self.generation
            if any(self.waiting[key] for key in keys):
                self.condition.notify_all()

    def changed_since(self, key, generation):
        return self.changed_at.get(key, 0) > generation

    def wait(self, keys, generation, timeout):
        """Return once one of `keys` changed after `generation`, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.condition:
            self.waiting.update(keys)
            try:
                while not (self.closed or any(self.changed_since(key, generation) for key in keys)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self.condition.wait(remaining)
            finally:
                self.waiting.subtract(keys)
                for key in keys:
                    if not self.waiting[key]:
                        del self.waiting[key]

    def close(self):
        """Wake every waiter, now and later: the server is stopping, and a long poll must not hold it up."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()

    def forget(self, key):
        """Drop a key that will never change again (a closed Socket.IO session)."""
        with self.condition:
            self.changed_at.pop(key, None)


# ==== Filesystem ====
# Everything under a workflow folder is reached from an open descriptor of that folder, one name at
# a time, without following symlinks (openat with O_NOFOLLOW, mkdirat, renameat, fstatat): a symlink
# anywhere on the way is refused at the moment of use. Another local user, or a pipeline task writing
# in the folder, can swap a folder for a symlink to elsewhere at any moment; resolving a path, checking
# it and then using it let delete-path delete, upload-file write and downloads read outside (issue 11).

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO to read waits for a writer, which would hold the thread for good.
ENTRY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def relative_path_problem(path):
    """Why a user path cannot name something in the workflow folder, or None: the one path rule.

    Exactly one leading "/" stands for the workflow folder (nf-cloud's web UI sends "/reads/"), a
    trailing "/" is ignored, and "." and empty names are skipped.
    """
    if "\x00" in path:
        return "must not contain NUL"
    if any(ord(c) < 32 for c in path):
        return "must not contain control characters"
    if "\\" in path:
        return "must not contain backslashes"
    if path.startswith("//"):
        return "must be relative to the workflow folder (one leading / at most)"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        return "must be a path in the workflow folder, not a URL"
    if ".." in path.split("/"):
        return "must not contain '..'"
    encoded = path.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        return "is too long (at most %d bytes)" % MAX_PATH_BYTES
    if any(len(name) > MAX_NAME_BYTES for name in encoded.split(b"/")):
        return "has a name longer than %d bytes" % MAX_NAME_BYTES
    return None


def path_parts(path):
    return [name for name in path.split("/") if name not in ("", ".")]


def path_names(path, field):
    """The names leading from the workflow folder to `path` ([] for the folder itself); 422 when
    `path` breaks the rule."""
    if not isinstance(path, str):
        raise ApiError(422, field, "must be a string")
    problem = relative_path_problem(path)
    if problem:
        raise ApiError(422, field, problem)
    return path_parts(path)


def normal_path(path):
    """The one spelling of a valid path: "/reads/a.fq", "reads//a.fq" and "reads/a.fq" are the same."""
    return "/".join(path_parts(path)) or "."


def workflow_path(root, path, field):
    """The absolute path that `path` names in the workflow folder `root`, for the pipeline."""
    return os.path.join(root, *path_names(path, field))


def check_file_name(name):
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ApiError(422, "file", "the file name must be a single name, without / or \\")
    problem = relative_path_problem(name)
    if problem:
        raise ApiError(422, "file", "the file name " + problem)


def is_utf8(name):
    """Whether a name read from the disk is UTF-8 (os.fsdecode keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Descriptor:
    """An open file descriptor, closed at the end of a `with` block or, like a file object, when it is
    dropped: an answer that is never sent (the client left) cannot leak it."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self.fd

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close

    def detach(self):
        fd, self.fd = self.fd, None
        return fd


def open_folder(parent, names, field, create=False):
    """The folder `names` below the folder descriptor `parent`, opened one name at a time; with
    `create`, missing folders are made (0700) on the way. Returns a Descriptor."""
    folder = Descriptor(os.dup(parent))
    for name in names:
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=folder.fd)
            child = Descriptor(os.open(name, FOLDER_FLAGS, dir_fd=folder.fd))
        except OSError as e:
            raise client_error(e, field, folder.fd, name, create)
        finally:
            folder.close()
        folder = child
    return folder


def client_error(error, field, folder, name, creating=False):
    """The answer for an OSError met at `name` in the folder descriptor `folder`: an ApiError when
    the client's path is the cause, else the error itself."""
    code = error.errno
    if code == errno.ELOOP or code == errno.ENOTDIR and is_symlink(folder, name):
        return ApiError(422, field, "%s is a symlink: symlinks in the workflow folder are not followed" % name)
    if code == errno.ENOTDIR:
        return ApiError(409 if creating else 422, field, "%s is a file, not a folder" % name)
    if code == errno.ENOENT:
        return ApiError(404, field, "no such file or folder: %s" % name)
    if code in (errno.ENXIO, errno.ENODEV):
        return ApiError(422, field, "%s is not a regular file or folder" % name)
    if code == errno.ENAMETOOLONG:
        return ApiError(422, field, "is too long for the filesystem")
    if code in (errno.EACCES, errno.EPERM):
        return ApiError(403, field, "%s: the server is not allowed in (permission denied)" % name)
    return error


def is_symlink(folder, name):
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_entry(folder, name, field):
    """The file or folder `name` in the folder descriptor `folder`: (Descriptor, stat). A symlink,
    FIFO, device or socket is refused, without waiting on it."""
    try:
        entry = Descriptor(os.open(name, ENTRY_FLAGS, dir_fd=folder))
    except OSError as e:
        raise client_error(e, field, folder, name)
    st = os.fstat(entry.fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        entry.close()
        raise ApiError(422, field, "%s is not a regular file or folder" % name)
    return entry, st


def open_below(top, names):
    """The file `names` below the folder path `top`, opened one name at a time without following a
    symlink or waiting for a FIFO's writer: a Descriptor, or the OSError that os.open raises (ELOOP
    or ENOTDIR for a link on the way). O_NOFOLLOW alone guards the last name only, and the pipeline
    writes beside launch/<id> and runs/<id>, so it could make either folder a link."""
    folder = Descriptor(os.open(top, FOLDER_FLAGS))
    for name in names[:-1]:
        parent = folder
        with parent:
            folder = Descriptor(os.open(name, FOLDER_FLAGS, dir_fd=parent.fd))
    with folder:
        return Descriptor(os.open(names[-1], ENTRY_FLAGS, dir_fd=folder.fd))


def path_lstat(root, names, field):
    """The stat of `names` below the folder descriptor `root`, not following a symlink at the end;
    None when it, or a folder on the way, does not exist."""
    try:
        with open_folder(root, names[:-1], field) as folder:
            return os.stat(names[-1], dir_fd=folder, follow_symlinks=False) if names else os.fstat(folder)
    except FileNotFoundError:
        return None
    except ApiError as e:
        if e.status == 404:
            return None
        raise


GLOB_MAGIC = re.compile(r"[*?[]")


def glob_matches(root, patterns):
    """Whether the pattern `patterns` (one per name) matches a file or folder below `root`, walked by
    descriptor: glob.glob would follow symlinks. As in glob, `*` does not match a leading "."."""
    if not patterns:
        return True
    # Depth first, one open folder per level: each level's candidates for the pattern of its depth.
    levels = [(Descriptor(os.dup(root)), iter(names_matching(root, patterns[0])))]
    try:
        while levels:
            folder, candidates = levels[-1]
            name = next(candidates, None)
            if name is None:
                levels.pop()[0].close()
            elif len(levels) == len(patterns):
                if is_file_or_folder(folder.fd, name):
                    return True
            else:
                with contextlib.suppress(OSError):
                    child = Descriptor(os.open(name, FOLDER_FLAGS, dir_fd=folder.fd))
                    levels.append((child, iter(names_matching(child.fd, patterns[len(levels)]))))
        return False
    finally:
        for folder, _ in levels:
            folder.close()


def names_matching(folder, pattern):
    if not GLOB_MAGIC.search(pattern):
        return [pattern]
    return [name for name in os.listdir(folder)
            if fnmatch.fnmatchcase(name, pattern) and (pattern.startswith(".") or not name.startswith("."))]


def is_file_or_folder(folder, name):
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def make_private_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)


def trash_path(trash):
    return os.path.join(trash, "%sdeleted-%s" % (TEMP_PREFIX, secrets.token_hex(8)))


def remove_tree_atomically(path, trash):
    """Move a file or folder to the trash folder first so it vanishes in one step, then delete it."""
    doomed = trash_path(trash)
    os.rename(path, doomed)
    delete_tree(doomed)


def delete_tree(path):
    """Delete a file or folder in the trash (tmp/), as far as it can be deleted (what is left goes at
    the next start). shutil.rmtree recursed once per level: nested folders 1,000 deep were a
    RecursionError. This walk keeps one descriptor, and a list of names per level; it climbs back
    with "..", which is safe here and only here: the trash is private to this server and nothing
    else works in it. Symlinks inside are removed, never followed."""
    try:
        folder = Descriptor(os.open(path, FOLDER_FLAGS))
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(path)
        return
    levels = [(unlink_files(folder.fd), None)]
    while levels:
        subfolders, name = levels[-1]
        if subfolders:
            sub = subfolders.pop()
            with contextlib.suppress(OSError):
                child = Descriptor(os.open(sub, FOLDER_FLAGS, dir_fd=folder.fd))
                folder.close()
                folder = child
                levels.append((unlink_files(folder.fd), sub))
            continue
        levels.pop()
        if levels:
            parent = Descriptor(os.open("..", FOLDER_FLAGS, dir_fd=folder.fd))
            folder.close()
            folder = parent
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=folder.fd)
    folder.close()
    with contextlib.suppress(OSError):
        os.rmdir(path)


def unlink_files(folder):
    """Unlink everything in the folder descriptor but its folders; returns the folders' names."""
    subfolders = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.name)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=folder)
    return subfolders


# ==== Data folder ====
# One server per data folder, and never someone else's folder: checked before anything is written.

DATA_FOLDER_NAMES = {"nfapi.sqlite3", "nfapi.sqlite3-wal", "nfapi.sqlite3-shm", "api-token", "api-read-token",
                     "lock", "server.json", "workflows", "launch", "runs", "tmp", "nfapi.sock"}


def refuse_foreign_folder(path):
    """Exit when `path` is a folder with files of its own: nfapi would make it private (0700) and mix
    its files with the user's (`--data ~` would shut others out of a home folder). A folder nfapi
    started before (nfapi.sqlite3, or only names nfapi uses) is adopted, and so is an empty one."""
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return
    if "nfapi.sqlite3" not in names and not names <= DATA_FOLDER_NAMES:
        sys.exit("nfapi: %s is not empty and is not an nfapi data folder (it has no nfapi.sqlite3); "
                 "choose a new or empty folder with --data" % path)


def lock_data_folder(path):
    """Hold an exclusive lock on <data>/lock while the server runs and write our pid into it: a second
    server on the same folder would empty tmp/ under the first one's uploads. Returns the open fd."""
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        sys.exit("nfapi: %s is in use by another nfapi server (pid %s); stop that one or choose another --data"
                 % (path, holder))
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def write_server_file(data_dir, host, port):
    """<data>/server.json, written once we listen: our address and pid. `make run` starts the worker
    only when this names the server it started, so the token never goes to another program that
    holds the port. Written whole (temp file, then rename): a reader never sees half of it."""
    url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)
    info = json.dumps({"url": url, "host": host, "port": port, "pid": os.getpid()})
    temp_dir = os.path.join(data_dir, "tmp")  # same filesystem, and emptied at start
    with tempfile.NamedTemporaryFile("w", dir=temp_dir, prefix=TEMP_PREFIX + "server-", delete=False) as f:
        f.write(info + "\n")
    os.replace(f.name, os.path.join(data_dir, "server.json"))


def remove_server_file(data_dir):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(data_dir, "server.json"))


# ==== Request bodies ====

def refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


JSON_DECODER = json.JSONDecoder(parse_constant=refuse_constant)  # NaN and Infinity are not JSON
LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # an escaped surrogate: maybe one without its pair


def parse_json(data):
    try:
        text = data.decode("utf-8")
        value = JSON_DECODER.decode(text)
        if LONE_SURROGATE_ESCAPE.search(text):
            # "\ud800" is valid JSON but no Unicode text: nothing could store or answer it.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, "body", "not valid JSON: %s" % str(e)[:200])
    return value


def json_body(data):
    """A request body as JSON; an empty body is `{}`."""
    return parse_json(data) if data.strip() else {}


# ==== Multipart ====

class MultipartParser:
    """A push parser for multipart/form-data (RFC 7578, RFC 2046 section 5.1).

    feed() takes chunks of any size and returns events in order:
        ("part", name, filename)  a part starts (filename is None for a plain field)
        ("data", bytes)           some of its content
        ("end",)                  the part ended
    close() raises unless the closing delimiter was seen. Only a possible partial delimiter is
    kept between chunks, so memory stays flat whatever the body size.
    """

    def __init__(self, boundary):
        self.delimiter = b"\r\n--" + boundary
        # The first delimiter may sit at the very start, without its CRLF.
        self.buffer = b"\r\n"
        # Where the unparsed input starts in buffer: parts are cut out at offsets, and the rest is
        # copied once per feed, not once per part (8 MB of 50-byte parts took seconds of CPU).
        self.at = 0
        self.state = "preamble"
        self.in_part = False

    def feed(self, chunk):
        events = []
        if self.state == "body" and self.feed_body_fast(chunk, events):
            return events
        self.buffer += chunk
        while self.state != "done":
            step = getattr(self, "_" + self.state)(events)
            if not step:
                break
        self.buffer, self.at = self.buffer[self.at:], 0
        return events

    def close(self):
        if self.state != "done":
            raise ApiError(400, "body", "the multipart body ended early")

    def feed_body_fast(self, chunk, events):
        """Inside a part, a chunk with no delimiter in it or across its start becomes data without
        being copied: the bulk of an upload. False when the general path must handle it."""
        keep = len(self.delimiter) - 1
        if len(chunk) < keep or self.delimiter in self.buffer + chunk[:keep] or self.delimiter in chunk:
            return False
        if self.buffer:
            events.append(("data", self.buffer))
        events.append(("data", memoryview(chunk)[:-keep]))
        self.buffer = chunk[-keep:]
        return True

    def _preamble(self, events):
        at = self.buffer.find(self.delimiter, self.at)
        if at < 0:
            self.at = max(self.at, len(self.buffer) - len(self.delimiter))
            return False
        self.at = at + len(self.delimiter)
        self.state = "after_delimiter"
        return True

    def _after_delimiter(self, events):
        if len(self.buffer) - self.at < 2:
            return False
        if self.in_part:
            events.append(("end",))
            self.in_part = False
        marker = self.buffer[self.at:self.at + 2]
        self.at += 2
        if marker == b"--":
            self.state = "done"
        elif marker == b"\r\n":
            self.state = "headers"
        else:
            raise ApiError(400, "body", "malformed multipart delimiter")
        return True

    def _headers(self, events):
        end = self.buffer.find(b"\r\n\r\n", self.at)
        if end < 0 and self.buffer.startswith(b"\r\n", self.at):
            end = self.at - 2  # no header lines at all
        elif end < 0:
            end = len(self.buffer)
        if end - self.at > MAX_PART_HEADER_BYTES:
            raise ApiError(400, "body", "multipart part headers are too large")
        if end == len(self.buffer):
            return False
        name, filename = parse_part_headers(self.buffer[self.at:max(end, self.at)])
        self.at = end + 4
        events.append(("part", name, filename))
        self.in_part = True
        self.state = "body"
        return True

    def _body(self, events):
        at = self.buffer.find(self.delimiter, self.at)
        if at < 0:
            end = len(self.buffer) - (len(self.delimiter) - 1)
            if end > self.at:
                events.append(("data", self.buffer[self.at:end]))
                self.at = end
            return False
        if at > self.at:
            events.append(("data", self.buffer[self.at:at]))
        self.at = at + len(self.delimiter)
        self.state = "after_delimiter"
        return True


def parse_part_headers(block):
    """Return (name, filename) from a part's header block; the name is required."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "body", "multipart headers must be UTF-8")
    disposition = None
    for line in text.split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep or "\r" in line or "\n" in line:
            raise ApiError(400, "body", "malformed multipart header line")
        if key.strip().lower() == "content-disposition":
            disposition = value.strip()
    if not disposition:
        raise ApiError(400, "body", "a multipart part has no Content-Disposition")
    header = email.message.Message()
    header["Content-Disposition"] = disposition
    if header.get_content_disposition() != "form-data":
        raise ApiError(400, "body", "multipart parts must be form-data")
    name = header.get_param("name", header="content-disposition")
    if not name:
        raise ApiError(400, "body", "a multipart part has no name")
    filename = header.get_param("filename", header="content-disposition")
    if filename is not None:
        # Browsers percent-encode exactly these three characters in file names (WHATWG HTML).
        filename = email.utils.collapse_rfc2231_value(filename)
        filename = filename.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    return email.utils.collapse_rfc2231_value(name), filename


def multipart_boundary(content_type):
    header = email.message.Message()
    header["Content-Type"] = content_type or ""
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise ApiError(400, "body", "expected multipart/form-data with a boundary")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise ApiError(400, "body", "the multipart boundary must be 1 to 70 ASCII characters")
    return boundary.encode("ascii")


# ==== Answers that are not JSON ====

class Body:
    """An answer's content: headers, a length (None: chunked) and a function that writes it, or,
    for small answers, the bytes themselves (sent with the head in one write)."""

    data = None

    def __init__(self, headers, length, write):
        self.headers, self.length, self.write_to = headers, length, write

    @classmethod
    def of(cls, headers, data):
        body = cls(headers, len(data), None)
        body.data = data
        return body

    @classmethod
    def json(cls, value):
        if value is None:
            return cls.of({}, b"")
        # UTF-8, not \u escapes. A file name that is not UTF-8 reaches us with lone surrogates
        # (surrogateescape): backslashreplace writes those as the \udcXX escape JSON already had.
        return cls.of({"Content-Type": "application/json"},
                      json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace"))


class ChunkedWriter:
    """A write-only stream that sends HTTP/1.1 chunks of about CHUNK_BYTES (zipfile and tarfile write
    many small pieces); close() sends the last chunk."""

    CHUNK_BYTES = 256 * 1024

    def __init__(self, wfile):
        self.wfile = wfile
        self.pending = []
        self.size = 0

    def write(self, data):
        self.pending.append(bytes(data))
        self.size += len(data)
        if self.size >= self.CHUNK_BYTES:
            self.send_pending()
        return len(data)

    def flush(self):
        pass

    def send_pending(self):
        if self.size:
            self.wfile.write(b"%x\r\n%s\r\n" % (self.size, b"".join(self.pending)))
            self.pending, self.size = [], 0

    def close(self):
        self.send_pending()
        self.wfile.write(b"0\r\n\r\n")


# ==== Workflows ====

def workflow_row(conn, workflow_id):
    row = conn.execute("SELECT * FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
    if row is None:
        raise no_workflow(workflow_id)
    return row


def no_workflow(workflow_id):
    return ApiError(404, "workflow", "no workflow with id %d" % workflow_id)


RUN_COLUMNS = ("status", "pipeline", "created_at", "started_at", "finished_at", "exit_code", "error_message",
               "submitted", "completed", "failed", "cached", "resume", "nextflow_run_name", "session_id", "worker",
               "command", "console_tail", "tasks_truncated", "late_report", "revision", "pinned_nextflow_version",
               "nextflow_version", "commit_id", "failed_tasks")
WORKFLOW_SELECT = """
    SELECT w.id, w.name, w.nextflow_workflow, w.nextflow_arguments, w.notify_email, r.id AS run_id, %s
    FROM workflows w""" % ", ".join("r." + c for c in RUN_COLUMNS) + """
    LEFT JOIN runs r ON r.id = (SELECT max(id) FROM runs WHERE workflow_id = w.id)
"""
NO_WORKER = "no worker is connected"


def run_json(row, run_id, absent_before):
    """A run as clients see it; the weblog secret is cut out of the command line. A queued run older
    than `absent_before` (see worker_absent_before) says that it waits for a worker."""
    run = {"id": run_id}
    run.update((column, row[column]) for column in RUN_COLUMNS)
    run["resume"] = bool(run["resume"])
    run["tasks_truncated"] = bool(run["tasks_truncated"])
    run["command"] = [redact(arg) for arg in json.loads(row["command"] or "[]")]
    run["late_report"] = json.loads(row["late_report"]) if row["late_report"] else None
    run["failed_tasks"] = json.loads(row["failed_tasks"] or "[]")
    waiting = row["status"] == "queued" and absent_before is not None and row["created_at"] < absent_before
    run["waiting_for"] = NO_WORKER if waiting else None
    return run


def worker_absent_before(app, conn):
    """now - `worker_absent_seconds` when no worker claimed or sent a heartbeat since then, else None.

    An idle worker claims at least every MAX_CLAIM_WAIT seconds (a long poll) and a busy one sends a
    heartbeat every second, so a worker not seen for longer has stopped or lost the server."""
    since = time.time() - app.config["worker_absent_seconds"]
    seen = conn.execute("SELECT max(last_seen) FROM workers").fetchone()[0]
    return since if seen is None or seen < since else None


def workflow_json(row, absent_before):
    """The seed's workflow shape, plus the latest run's `status` and that run as `run`."""
    run = None if row["run_id"] is None else run_json(row, row["run_id"], absent_before)
    return {
        "id": row["id"],
        "name": row["name"],
        "nextflow_arguments": json.loads(row["nextflow_arguments"]),
        "nextflow_workflow": row["nextflow_workflow"],
        "submitted_processes": row["submitted"] or 0,
        "completed_processes": row["completed"] or 0,
        "is_scheduled": row["status"] in ACTIVE_RUN_STATES,
        "status": row["status"],
        "run": run,
        "notify_email": json.loads(row["notify_email"]),
    }


def load_workflow(app, conn, workflow_id):
    row = conn.execute(WORKFLOW_SELECT + " WHERE w.id = ?", (workflow_id,)).fetchone()
    if row is None:
        raise no_workflow(workflow_id)
    return workflow_json(row, worker_absent_before(app, conn))


def active_run(conn, workflow_id):
    """The workflow's queued or running run, or None (the schema allows one at a time)."""
    return conn.execute("SELECT id, status FROM runs WHERE workflow_id = ? AND status IN ('queued', 'running')",
                        (workflow_id,)).fetchone()


def refuse_if_active(conn, workflow_id, action):
    if active_run(conn, workflow_id):
        raise ApiError(409, "workflow", "cannot %s while a run is queued or running" % action)


def merge_arguments(definitions, stored, given):
    """The configured definitions with values from `stored`, then `given`; raises 422 per argument.

    A client sends either `{name: value}` or `{name: {"value": value, ...}}` (the shape it read);
    only the value is taken, so the configured type and description can never be changed.
    """
    merged = {name: dict(definition, value=stored.get(name, {}).get("value", definition["value"]))
              for name, definition in definitions.items()}
    errors = {}
    for name, value in given.items():
        if name not in definitions:
            errors[name] = ["is not an argument of this pipeline"]
            continue
        if isinstance(value, dict):
            value = value.get("value")
        problem = argument_value_problem(definitions[name], value)
        if problem:
            errors[name] = [problem]
        else:
            merged[name]["value"] = stored_value(definitions[name], value)
    if errors:
        raise ApiError.of(422, errors)
    return merged


def stored_value(definition, value):
    """Path values are stored in one spelling (normal_path), whatever way the client wrote them."""
    if is_empty(value) or definition["type"] not in ("path", "paths", "file-glob"):
        return value
    return [normal_path(v) for v in value] if definition["type"] == "paths" else normal_path(value)


# ==== The run's Nextflow config ====
# nfapi's own settings for a run reach Nextflow in a config file of the run folder that the worker
# writes (0600) and passes with `-c`, never on its command line: every user of the node sees that in
# `ps`, and Nextflow copies it into .nextflow.log and .nextflow/history. The file holds the weblog,
# its secret sent as HTTP Basic (weblog.basicToken), and the trace file, report and timeline
# (NEXTFLOW.md 1.2, 3.6a), which also make Nextflow send task metrics.

RUN_CONFIG, TRACE_FILE = "nfapi.config", "trace.txt"
# Every trace field a user looks at, under Nextflow's names (TraceRecord.FIELDS).
TRACE_FIELDS = ("task_id", "hash", "native_id", "process", "tag", "name", "status", "exit", "attempt", "submit",
                "start", "complete", "duration", "realtime", "%cpu", "%mem", "peak_rss", "peak_vmem", "rchar", "wchar",
                "read_bytes", "write_bytes", "cpus", "memory", "time", "disk", "queue", "container", "hostname",
                "error_action", "workdir")
GROOVY_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def run_config(run_dir, weblog_url, secret, basic_token):
    """The text of a run's config. Nextflow before 23.10 has no weblog.basicToken (nf-weblog 1.1.0):
    without `basic_token` the secret goes in the weblog URL's query instead."""
    weblog = {"enabled": True, "url": weblog_url, "basicToken": "nfapi:" + secret} if basic_token else \
        {"enabled": True, "url": "%s&token=%s" % (weblog_url, secret)}
    scopes = [("weblog", weblog),
              ("trace", {"enabled": True, "file": os.path.join(run_dir, TRACE_FILE), "overwrite": True, "raw": True,
                         "fields": ",".join(TRACE_FIELDS)}),
              ("report", {"enabled": True, "file": os.path.join(run_dir, "report.html"), "overwrite": True}),
              ("timeline", {"enabled": True, "file": os.path.join(run_dir, "timeline.html"), "overwrite": True})]
    return "// Written by nfapi for this run only.\n" + "".join(
        "%s {\n%s}\n" % (scope, "".join("    %s = %s\n" % (key, groovy_value(v)) for key, v in settings.items()))
        for scope, settings in scopes)


def groovy_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return groovy_string(value)


def groovy_string(text):
    """`text` as a single-quoted Groovy string literal, which keeps `$` as it is (no interpolation).

    Quotes, backslashes and line breaks are escaped; everything else outside printable ASCII is
    written \\uXXXX (UTF-16), so the file is ASCII whatever charset Nextflow's JVM reads it with.
    Even a reader that turns \\uXXXX into characters before it parses (as javac does) gets no quote,
    backslash or line break from them: those are always written with their own escapes."""
    out = []
    for ch in text:
        if ch in GROOVY_ESCAPES:
            out.append(GROOVY_ESCAPES[ch])
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            units = ch.encode("utf-16-be", "surrogatepass")
            out.extend("\\u%02x%02x" % (units[i], units[i + 1]) for i in range(0, len(units), 2))
    return "'%s'" % "".join(out)


# ==== Handlers ====
# Each handler takes the request (a Request) and the route's parameters and returns
# (status, body): a dict is sent as JSON, None as an empty body.

def workflows_list(req):
    """List workflows by id; `offset` and `limit` page through them."""
    offset = req.query_int("offset", 0)
    limit = req.query_int("limit", -1)
    with req.db() as conn:
        rows = conn.execute(WORKFLOW_SELECT + " ORDER BY w.id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        absent_before = worker_absent_before(req.app, conn)
    return 200, {"workflows": [workflow_json(row, absent_before) for row in rows]}


def workflows_count(req):
    """Count the workflows."""
    with req.db() as conn:
        count = conn.execute("SELECT count(*) FROM workflows").fetchone()[0]
    return 200, {"count": count}


def workflow_create(req):
    """Create a workflow and its (empty) folder."""
    name = req.json().get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ApiError(422, "name", "must be a string of 1 to %d characters" % MAX_NAME_LENGTH)
    with req.app.db.write() as conn:
        workflow_id = conn.execute("INSERT INTO workflows (name, created_at) VALUES (?, ?)",
                                   (name, time.time())).lastrowid
    make_private_dir(req.app.workflow_dir(workflow_id))
    with req.db() as conn:
        workflow = load_workflow(req.app, conn, workflow_id)
    # The document's shape, and the fields at the top level as well: nf-cloud's web UI reads `id` there.
    return 200, dict(workflow, workflow=workflow)


def workflow_get(req, id):
    """One workflow with its latest run; `?wait=<seconds>`: once that run has ended."""
    return 200, {"workflow": answer_when_ended(req, id, lambda conn: load_workflow(req.app, conn, id))}


def answer_when_ended(req, workflow_id, read):
    """`read(conn)`, a workflow or a run: at once, or with `?wait=<seconds>` as soon as its run is in
    a final state (or there is no run), else when the wait is over, as it is then.

    It sleeps on the workflow's notifications (see Changes), so a waiting client costs no CPU, but
    it holds one of the server's slots: at most half of them wait at once, whoever asks. Past that
    it answers at once, as the wait may end early anyway (the client asks again), and the other half
    stays free for requests that must not wait, such as the worker's heartbeats.
    """
    wait = req.query_int("wait", 0)
    if wait > MAX_ANSWER_WAIT:
        raise ApiError(422, "wait", "must be a whole number of seconds from 0 to %d" % MAX_ANSWER_WAIT)
    with req.app.long_polls.hold(req.app.config["max_connections"] // 2 if wait else 0) as waiting:
        deadline = time.monotonic() + (wait if waiting else 0)
        while True:
            generation = req.app.changes.generation
            with req.db() as conn:
                answer = read(conn)
            remaining = deadline - time.monotonic()
            if answer["status"] not in ACTIVE_RUN_STATES or remaining <= 0:
                return answer
            req.app.changes.wait([workflow_id], generation, remaining)


def workflow_update(req, id):
    """Choose the pipeline, set argument values and the workflow's own e-mail recipients (not while a
    run is active)."""
    body = req.json()
    pipelines = req.app.config["pipelines"]
    given = body.get("nextflow_arguments", {})
    if not isinstance(given, dict):
        raise ApiError(422, "nextflow_arguments", "must be an object of arguments by name")
    recipients = notify_email_of(req.app, body)
    with req.app.db.write() as conn:
        row = workflow_row(conn, id)
        refuse_if_active(conn, id, "change a workflow")
        if recipients is not None:
            conn.execute("UPDATE workflows SET notify_email = ? WHERE id = ?", (json.dumps(recipients), id))
        name = body.get("nextflow_workflow", row["nextflow_workflow"])
        if isinstance(name, str) and name in pipelines:
            stored = json.loads(row["nextflow_arguments"]) if name == row["nextflow_workflow"] else {}
            merged = merge_arguments(pipelines[name]["dynamic"], stored, given)
            conn.execute("UPDATE workflows SET nextflow_workflow = ?, nextflow_arguments = ? WHERE id = ?",
                         (name, json.dumps(merged), id))
        elif "nextflow_workflow" in body:
            raise ApiError(422, "nextflow_workflow", "unknown pipeline (see /api/nextflow-workflows)")
        elif given:
            raise ApiError(422, "nextflow_workflow", "choose a pipeline before setting its arguments")
    req.app.changes.notify(id)
    return 200, {}


def notify_email_of(app, body):
    """The workflow's own e-mail recipients an update sets (each once), or None when it sets none."""
    if "notify_email" not in body:
        return None
    recipients = body["notify_email"]
    if not isinstance(recipients, list) or len(recipients) > MAX_NOTIFY_EMAILS or \
            not all(is_email_address(r) for r in recipients):
        raise ApiError(422, "notify_email", "must be a list of up to %d e-mail addresses such as ada@example.org "
                                            "(an empty list removes them)" % MAX_NOTIFY_EMAILS)
    if recipients and app.config["notify"]["email"] is None:
        raise ApiError(422, "notify_email", "this server sends no e-mail: its operator has not set notify.email "
                                            "in the configuration")
    return list(dict.fromkeys(recipients))


def workflow_delete(req, id):
    """Delete a workflow, its files and its runs (not while a run is active)."""
    with req.app.db.write() as conn:
        workflow_row(conn, id)
        refuse_if_active(conn, id, "delete a workflow")
        runs = [row["id"] for row in conn.execute("SELECT id FROM runs WHERE workflow_id = ?", (id,))]
        conn.execute("DELETE FROM workflows WHERE id = ?", (id,))
    # Run folders go too: their logs hold the weblog URL with the run's secret.
    req.app.changes.notify(id)
    for folder in [req.app.workflow_dir(id), req.app.launch_dir(id)] + [req.app.run_dir(run) for run in runs]:
        if os.path.exists(folder):
            remove_tree_atomically(folder, req.app.tmp_dir)
    return 200, {}


def workflow_files(req, id):
    """The folders and files in `dir` (default: the workflow folder), sorted; symlinks show as files."""
    names = path_names(req.query_str("dir", ""), "dir")
    folders, files = [], []
    with req.app.open_workflow_folder(id) as root, open_folder(root, names, "dir") as folder:
        for entry in os.scandir(folder):
            # A name that is not UTF-8 can be neither written in JSON nor sent back in a request, so it
            # is left out; the folder holding it can still be downloaded (tar.gz keeps it) or deleted.
            if is_utf8(entry.name):
                (folders if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
    return 200, {"folders": sorted(folders), "files": sorted(files)}


def workflow_upload_file(req, id):
    """Stream a multipart upload into a temp file, and rename it into place once the body is complete."""
    limit = req.app.config["max_upload_bytes"]
    if limit is not None and req.body_left > limit:
        raise ApiError(413, "file", "the upload is larger than %d bytes" % limit)
    with req.app.open_workflow_folder(id) as root:
        with req.db() as conn:
            refuse_if_active(conn, id, "upload files")  # before the body, which may be large
        parser = MultipartParser(multipart_boundary(req.headers.get("content-type")))
        temp = tempfile.NamedTemporaryFile(dir=req.app.tmp_dir, prefix=TEMP_PREFIX + "upload-", delete=False)
        try:
            with disk_full_is_507():
                filename, fields = receive_form(req, parser, temp)
                directory = fields.get("directory", "")
                names = path_names(directory, "directory")
                check_file_name(filename)
                os.fsync(temp.fileno())
                temp.close()
                with changing_files(req.app, id, "upload files"), \
                        open_folder(root, names, "directory", create=True) as folder:
                    place_file(temp.name, folder, filename)
        finally:
            temp.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp.name)
    return 200, {"directory": directory, "file": filename}


def place_file(path, folder, name):
    """Rename the server's file `path` to `name` in the folder descriptor `folder`, replacing a file."""
    try:
        os.rename(path, name, dst_dir_fd=folder)
    except IsADirectoryError:
        raise ApiError(409, "file", "a folder with that name exists")
    except OSError as e:
        raise client_error(e, "file", folder, name)


def receive_form(req, parser, temp):
    """Feed the body to `parser`: the `file` part streams into `temp`, and the few FORM_FIELDS are
    kept, each up to MAX_FORM_FIELD_BYTES. Any other part is refused at its start, so nothing unknown
    is ever kept. Returns (the file part's name, {field: text})."""
    filename, fields, current = None, {}, None
    for chunk in req.body_chunks():
        for event in parser.feed(chunk):
            if event[0] == "part":
                current = event[1]
                if current == "file":
                    if filename is not None or event[2] is None:
                        raise ApiError(422, "file", "expected one `file` part with a file name")
                    filename = event[2]
                elif current not in FORM_FIELDS:
                    raise ApiError(422, current, "is not a field of this form (send `file` and `directory`)")
                elif current in fields:
                    raise ApiError(422, current, "is sent twice")
                else:
                    fields[current] = bytearray()
            elif event[0] == "data":
                if current == "file":
                    temp.write(event[1])
                else:
                    fields[current] += event[1]
                    if len(fields[current]) > MAX_FORM_FIELD_BYTES:
                        raise ApiError(413, current, "this form field is too large")
    parser.close()
    if filename is None:
        raise ApiError(422, "file", "a file part with a file name is required")
    return filename, {name: form_text(name, value) for name, value in fields.items()}


def form_text(name, value):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, name, "must be UTF-8")


@contextlib.contextmanager
def disk_full_is_507():
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, "file", "the server's disk is full")
        raise


@contextlib.contextmanager
def changing_files(app, workflow_id, action):
    """A write transaction in which the workflow exists and has no queued or running run, for a file
    change made inside it: the change and those checks are one step, so a workflow deleted meanwhile
    is not brought back (404) and a run's inputs do not change under it (409). The change is a rename
    or a few mkdirs, the only file work done in a transaction."""
    with app.db.write() as conn:
        workflow_row(conn, workflow_id)
        refuse_if_active(conn, workflow_id, action)
        yield


def workflow_delete_path(req, id):
    """Delete a file or a folder with everything in it."""
    names = path_names(req.json().get("path"), "path")
    if not names:
        raise ApiError(422, "path", "cannot delete the workflow folder itself")
    doomed = trash_path(req.app.tmp_dir)  # tmp/ and workflows/ are in the data folder: one filesystem
    with req.app.open_workflow_folder(id) as root, open_folder(root, names[:-1], "path") as folder:
        with changing_files(req.app, id, "delete files"):
            try:
                os.rename(names[-1], doomed, src_dir_fd=folder)
            except OSError as e:
                raise client_error(e, "path", folder, names[-1])
    delete_tree(doomed)
    return 200, None


def workflow_create_folder(req, id):
    """Create a folder (and its parents): `path`, or `new_path` inside `target_path` (nf-cloud's UI)."""
    names, field = folder_to_create(req.json())
    with req.app.open_workflow_folder(id) as root, changing_files(req.app, id, "create folders"):
        open_folder(root, names, field, create=True).close()
    return 200, None


def folder_to_create(body):
    """(the names of the folder to create, the field they came from)."""
    if "path" in body or "new_path" not in body:
        names, field = path_names(body.get("path"), "path"), "path"
    else:
        new = path_names(body["new_path"], "new_path")
        if not new:
            raise ApiError(422, "new_path", "must name the new folder")
        names, field = path_names(body.get("target_path", ""), "target_path") + new, "new_path"
    if not names:
        raise ApiError(422, field, "cannot create the workflow folder itself")
    return names, field


def workflow_schedule(req, id):
    """Queue a run and answer it; `{"resume": true}` relaunches with -resume on the latest run's Nextflow session."""
    resume = req.json().get("resume", False)
    if not isinstance(resume, bool):
        raise ApiError(422, "resume", "must be true or false")
    # Checked outside the transaction (it reads the disk); the insert then makes sure the
    # workflow is still what was checked.
    with req.db() as conn:
        checked, name, arguments, params, session = prepare_run(req.app, conn, id, resume)
    pipeline = req.app.config["pipelines"][name]
    with req.app.db.write() as conn:
        refuse_if_active(conn, id, "schedule a workflow")
        if tuple(workflow_row(conn, id)) != tuple(checked):
            raise ApiError(409, "workflow", "the workflow changed while it was being scheduled; try again")
        run_id = queue_run(conn, id, pipeline=name, arguments=json.dumps(arguments), params=json.dumps(params),
                  resume=int(resume), resume_session=session, revision=pipeline.get("revision"),
                  pinned_nextflow_version=pipeline.get("nextflow_version"))
        run = run_json(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone(), run_id, None)
    req.app.changes.notify(id, QUEUED_RUNS)
    return 200, {"is_scheduled": True, "run": run}


def queue_run(conn, workflow_id, **columns):
    """Insert a queued run with these columns and a new weblog secret; return its id."""
    columns.update(workflow_id=workflow_id, status="queued", secret=secrets.token_urlsafe(24), created_at=time.time())
    return conn.execute("INSERT INTO runs (%s) VALUES (%s)" % (", ".join(columns), ", ".join("?" * len(columns))),
                        list(columns.values())).lastrowid


def workflow_command(req, id):
    """The exact argv, params file and run config the worker would run if the workflow were scheduled now.

    Nothing runs. Only the run's id and weblog secret are not known yet: they show as `<run id>`
    and `<secret>`. `config` is the run config for Nextflow 23.10 and later (nfapi.config, given
    with -c). 422 with the same errors as `schedule` when it could not be scheduled.
    """
    resume = req.query_bool("resume")
    with req.db() as conn:
        _, name, arguments, params, session = prepare_run(req.app, conn, id, resume)
    run = {"id": "<run id>", "workflow_id": id, "secret": "<secret>", "params": json.dumps(params),
           "resume_session": session}
    launch = launch_spec(req.app, run, req.app.config["pipelines"][name], weblog_host(req))
    return 200, {key: launch[key] for key in ("argv", "cwd", "params", "params_file", "config")}


def prepare_run(app, conn, workflow_id, resume):
    """Everything a new run needs, checked: (workflow row, pipeline name, arguments, params, session).
    Raises 422 with one message per argument that is missing, invalid or not on disk."""
    row = workflow_row(conn, workflow_id)
    name = row["nextflow_workflow"]
    pipeline = app.config["pipelines"].get(name)
    if pipeline is None:
        raise ApiError(422, "nextflow_workflow", "choose a pipeline first")
    arguments = merge_arguments(pipeline["dynamic"], json.loads(row["nextflow_arguments"]), {})
    check_launchable(app, workflow_id, arguments)
    session = resume_session(conn, workflow_id) if resume else None
    return row, name, arguments, nextflow_params(pipeline, arguments, app.workflow_dir(workflow_id)), session


def check_launchable(app, workflow_id, arguments):
    """Raise 422 with one message per argument that is missing, invalid or not on disk."""
    with app.open_workflow_folder(workflow_id) as root:
        errors = {arg: [problem] for arg, problem in
                  ((arg, launch_problem(definition, root, arg)) for arg, definition in arguments.items()) if problem}
    if errors:
        raise ApiError.of(422, errors)


def launch_problem(definition, root, name):
    """Why an argument cannot be launched with as it is: empty but required, invalid, or (paths and
    patterns) not what is in the workflow folder, the descriptor `root`."""
    value = definition["value"]
    if is_empty(value):
        return "cannot be empty" if definition.get("required") else None
    problem = argument_value_problem(definition, value)
    if problem:
        return problem
    try:
        if definition["type"] in ("path", "paths"):
            return next(filter(None, (disk_path_problem(definition, root, v, name)
                                      for v in (value if isinstance(value, list) else [value]))), None)
        if definition["type"] == "file-glob":
            matched = glob_matches(root, path_names(value, name))
            return None if matched else "matches no file in the workflow folder"
    except ApiError as e:
        return e.errors[name][0]
    return None


def disk_path_problem(definition, root, value, name):
    st = path_lstat(root, path_names(value, name), name)
    if st is None:
        return "%s does not exist" % value if definition.get("exists") else None
    if stat.S_ISLNK(st.st_mode):
        return "%s is a symlink: symlinks in the workflow folder are not followed" % value
    if stat.S_ISDIR(st.st_mode):
        return None if definition.get("selectable_folders") else "%s is a folder, a file is expected" % value
    if not stat.S_ISREG(st.st_mode):
        return "%s is not a regular file or folder" % value
    return None if definition.get("selectable_files") else "%s is a file, a folder is expected" % value


def resume_session(conn, workflow_id):
    row = conn.execute("SELECT session_id FROM runs WHERE workflow_id = ? AND session_id IS NOT NULL "
                       "ORDER BY id DESC LIMIT 1", (workflow_id,)).fetchone()
    if row is None:
        raise ApiError(422, "resume", "there is no earlier Nextflow session to resume")
    return row["session_id"]


def nextflow_params(pipeline, arguments, root):
    """The params file's content: user values converted by type, static arguments merged last.
    Empty optional arguments are left out, so the pipeline's own defaults apply."""
    params = {}
    for group in (arguments, pipeline["static"]):
        for name, definition in group.items():
            if not is_empty(definition["value"]):
                params[name] = param_value(definition, root, name)
    return params


def param_value(definition, root, name):
    value, kind = definition["value"], definition["type"]
    if kind in ("path", "file-glob"):
        return workflow_path(root, value, name)
    if kind == "paths":
        return ",".join(workflow_path(root, v, name) for v in value)
    return value


def workflow_cancel(req, id):
    """Cancel the active run: a queued one at once, a running one through its worker (SIGTERM)."""
    now = time.time()
    with req.app.db.write() as conn:
        workflow_row(conn, id)
        run = active_run(conn, id)
        if run is None:
            raise ApiError(409, "workflow", "no queued or running run to cancel")
        if run["status"] == "queued":
            conn.execute("UPDATE runs SET status = 'cancelled', finished_at = ?, error_message = ? "
                         "WHERE id = ? AND status = 'queued'", (now, "cancelled before it started", run["id"]))
            queue_notifications(req.app, conn, [run["id"]])
        else:
            conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (run["id"],))
        workflow = load_workflow(req.app, conn, id)
    req.app.changes.notify(id)
    return 200, {"workflow": workflow}


def workflow_finished(req, id):
    """The worker that holds the run's claim reports how nextflow ended. Repeating the report changes
    nothing. `lost` is final: a report for a lost run is kept as its `late_report`, nothing else changes.
    Before a running run ends, its tasks are brought to Nextflow's trace file (reconcile_tasks).

    Which error a client sees: Nextflow's own errorMessage (from its `completed` post, taken while the
    run is active) when there is one, as it names the cause; else the console tail the worker sends.
    A weblog post can forge the first, but the tail is kept apart as `console_tail`: only the claim's
    holder can set it, and nothing replaces it.
    """
    body = req.json()
    run_id, exit_code = body.get("run_id"), body.get("exit_code")
    if not is_int(run_id):
        raise ApiError(422, "run_id", "must be an integer")
    if exit_code is not None and not is_int(exit_code):
        raise ApiError(422, "exit_code", "must be an integer or null")
    reconcile_tasks(req, id, run_id, body.get("claim_secret"))
    now = time.time()
    with req.app.db.write() as conn:
        run = claimed_run(conn, run_id, body.get("claim_secret"), id)
        tail = body.get("error")
        tail = mask_secrets(tail[-MAX_WEBLOG_TEXT:], log_secrets(req.app, run)) if isinstance(tail, str) else None
        cancelled = bool(run["cancel_requested"]) or body.get("cancelled") is True
        if run["status"] == "lost":
            report = {"reported_at": now, "exit_code": exit_code, "cancelled": cancelled, "console_tail": tail}
            conn.execute("UPDATE runs SET late_report = ? WHERE id = ? AND status = 'lost'",
                         (json.dumps(report), run_id))
        elif run["status"] == "running":
            status = "cancelled" if cancelled else "succeeded" if exit_code == 0 else "failed"
            error = None
            if status != "succeeded":
                error = run["nextflow_error"] or tail or "nextflow exited with code %s" % exit_code
            conn.execute("UPDATE runs SET status = ?, finished_at = ?, exit_code = ?, error_message = ?, "
                         "console_tail = ?, lease_until = NULL WHERE id = ? AND status = 'running'",
                         (status, now, exit_code, error, tail, run_id))
            queue_notifications(req.app, conn, [run_id])
    if run["status"] == "lost":
        req.app.changes.notify(QUEUED_RUNS)  # the workflow's next run no longer waits for this one (claim_next_run)
    req.app.changes.notify(id)
    return 200, None


def claimed_run(conn, run_id, claim_secret, workflow_id=None):
    """The run, when `claim_secret` is the one its claim gave the worker; else 404 or 403.

    The worker's name is public (run JSON): the claim secret is what proves a report comes from the
    worker that holds the run."""
    run = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if run is None or workflow_id not in (None, run["workflow_id"]):
        raise ApiError(404, "run_id", "no such run for this workflow")
    if not holds_claim(run, claim_secret):
        raise ApiError(403, "claim_secret", "only the worker holding this run's claim may report on it; "
                                            "send the claim_secret its claim answer gave")
    return run


def holds_claim(run, claim_secret):
    return isinstance(claim_secret, str) and run["claim_secret"] is not None and \
        hmac.compare_digest(claim_secret.encode(), run["claim_secret"].encode())


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def run_secret_auth(handler):
    """Mark a route that authenticates with a run's weblog secret instead of the API token."""
    handler.run_secret_auth = True
    return handler


@run_secret_auth
def workflow_nextflow_log(req, id):
    """Nextflow's weblog (one POST per event, sequential, waiting for each answer): check, promise,
    answer, record.

    A checked post is appended to the promises file, answered, and then recorded (Request.answer_first):
    the sender's next post travels while this one is written, and a server killed in between records
    it at its next start (keep_weblog_promises). So a post answered 200 is never lost. A FAILED task's
    post is answered once it is recorded and remembered among the run's failed_tasks.

    The URL carries `?run=<run id>`, and the secret comes as HTTP Basic `<any user>:<secret>`
    (weblog.basicToken, Nextflow 23.10 on) or in the URL as `&token=<secret>` (older Nextflow). The
    secret is checked before the body is read: a wrong one is answered (and the connection closed)
    without reading its body. It works until `weblog_grace_seconds` after the run ended. Counting is
    idempotent: tasks are rows keyed by (run, task_id).
    """
    run_id, secret = req.query_int("run", None), req.weblog_secret()
    run = known_weblog_run(req, id, run_id)
    refusal = weblog_refusal(req.app, run, secret)
    if refusal:
        raise refusal
    if req.body_left > MAX_WEBLOG_BYTES:
        raise ApiError(413, "body", "weblog posts are limited to %d bytes" % MAX_WEBLOG_BYTES)
    message = req.json()

    def record(conn):
        return record_weblog_post(req.app, conn, id, run_id, message)
    trace = message.get("trace")
    if isinstance(trace, dict) and trace.get("status") == "FAILED":
        req.app.db.write_together(record)
        remember_failed_tasks(req.app, run)  # a file read and a write more, for failed tasks only
    else:
        with req.answer_first(200, b"%d %d\n%s" % (id, run_id, req.json_text)):
            req.app.db.write_together(record)
    req.app.changes.notify(id)
    return 200, None


def record_weblog_post(app, conn, workflow_id, run_id, message):
    """Record a post that was checked and answered; the run is read again, in the write transaction:
    it may have changed since, or been deleted with its workflow (the post is then left out)."""
    run = weblog_run(conn, workflow_id, run_id)
    if run is not None:
        record_weblog(app, conn, run, message)
    return run


def keep_weblog_promises(app):
    """At start, record the posts a killed server had answered and not recorded (Database.promise;
    no FAILED task's post among them). The promises file may hold posts recorded already: recording
    a post again changes nothing."""
    def keep(conn, entry):
        head, _, body = entry.partition(b"\n")
        workflow_id, run_id = map(int, head.split())
        record_weblog_post(app, conn, workflow_id, run_id, json_body(body))
    app.db.keep_old_promises(keep)


def weblog_run(conn, workflow_id, run_id):
    return None if run_id is None else conn.execute(
        "SELECT id, workflow_id, secret, status, finished_at, submitted FROM runs WHERE id = ? AND workflow_id = ?",
        (run_id, workflow_id)).fetchone()


def known_weblog_run(req, workflow_id, run_id):
    """The run as the check before a post's body is read sees it, from App.weblog_runs.

    A post is one upsert: a read of its own would cost it a tenth more. A run that has not ended is
    read again after WEBLOG_CACHE_SECONDS, which is within the grace period (1 s at least): a post
    the cache lets through is never one past the grace. The write transaction checks again anyway.
    """
    cached = req.app.weblog_runs.get(run_id)
    if cached and cached[0]["workflow_id"] == workflow_id and (
            cached[0]["finished_at"] is not None or time.monotonic() < cached[1] + WEBLOG_CACHE_SECONDS):
        return cached[0]
    with req.db() as conn:
        run = weblog_run(conn, workflow_id, run_id)
    if run is not None:
        if len(req.app.weblog_runs) >= WEBLOG_CACHE_RUNS:
            req.app.weblog_runs.clear()
        req.app.weblog_runs[run_id] = (run, time.monotonic())
    return run


def weblog_refusal(app, run, secret):
    """Why a weblog post for `run` may not be recorded, as the ApiError to answer; None when it may."""
    if run is None or not hmac.compare_digest(secret.encode(), run["secret"].encode()):
        return ApiError(401, "token", "missing or wrong run secret", {"WWW-Authenticate": 'Basic realm="nfapi run"'})
    if run["finished_at"] is not None and time.time() > run["finished_at"] + app.config["weblog_grace_seconds"]:
        return ApiError(409, "run", "the run has ended; its weblog secret no longer works")
    return None


def record_weblog(app, conn, run, message):
    """Tasks are recorded as long as the secret works; the run's own fields only while it is active
    (a late or forged post cannot rewrite a run that ended)."""
    event = message.get("event") or message.get("runStatus")
    trace = message.get("trace")
    if isinstance(trace, dict):
        record_task(app, conn, run, trace)
    if run["status"] not in ACTIVE_RUN_STATES:
        return
    if event == "started":
        session = message.get("runId")
        # A later -resume launch puts the session id on nextflow's command line: nothing but a
        # session id may ever get there.
        if isinstance(session, str) and SESSION_ID.fullmatch(session):
            conn.execute("UPDATE runs SET nextflow_run_name = ?, session_id = ? WHERE id = ?",
                         (text_or_none(message.get("runName")), session, run["id"]))
        record_what_ran(conn, run["id"], message)
    elif event == "completed":
        metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
        workflow = metadata.get("workflow") if isinstance(metadata.get("workflow"), dict) else {}
        stats = workflow.get("stats") if isinstance(workflow.get("stats"), dict) else {}
        success, cached = workflow.get("success"), stats.get("cachedCount")
        if not (is_int(cached) and 0 <= cached <= app.config["max_tasks_per_run"]):
            cached = None
        conn.execute("UPDATE runs SET nextflow_success = ?, nextflow_error = ?, cached = ? WHERE id = ?",
                     (int(success) if isinstance(success, bool) else None, text_or_none(workflow.get("errorMessage")),
                      cached, run["id"]))


def record_what_ran(conn, run_id, message):
    """The Nextflow version and, for a remote pipeline, the git commit that a `started` post reports
    (metadata.workflow.nextflow.version and metadata.workflow.commitId, NEXTFLOW.md 1.7 and 1.8)."""
    version = reported(message, "metadata", "workflow", "nextflow", "version")
    commit = reported(message, "metadata", "workflow", "commitId")
    # The first report wins: Nextflow posts `started` before any task, and a later post with the run's
    # secret must not choose the commit and Nextflow version a relaunch runs.
    conn.execute("UPDATE runs SET nextflow_version = coalesce(nextflow_version, ?), commit_id = coalesce(commit_id, ?) "
                 "WHERE id = ?", (version if matches(REPORTED_VERSION, version) else None,
                                  commit if matches(COMMIT_ID, commit) else None, run_id))


def reported(message, *keys):
    """message[key][key]...: None where a level is missing or is not an object."""
    for key in keys:
        if not isinstance(message, dict):
            return None
        message = message.get(key)
    return message


def matches(pattern, value):
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def record_task(app, conn, run, trace):
    """Upsert one task from a trace record: a weblog post's `trace`, or a row of Nextflow's trace file
    (raw values) as a dict keyed by the same field names. Each field of TASK_FIELDS is kept in
    Nextflow's unit when it is what that field can be, else null; a field a record leaves out keeps
    what an earlier one said. Its status only moves forward (a late RUNNING never undoes COMPLETED,
    and a final status never changes), so a repeated or reordered post counts once; triggers keep the
    run's and the processes' counters. Past `max_tasks_per_run` tasks, new ones are left out and the
    run says so."""
    task_id, status = trace.get("task_id"), trace.get("status")
    if not is_int(task_id) or not 0 < task_id <= MAX_TASK_ID or not isinstance(status, str) \
            or status not in TASK_STATUS_RANK:  # `in` would raise on a list or an object
        return
    if run["submitted"] >= app.config["max_tasks_per_run"] and conn.execute(
            "SELECT 1 FROM tasks WHERE run_id = ? AND task_id = ?", (run["id"], task_id)).fetchone() is None:
        conn.execute("UPDATE runs SET tasks_truncated = 1 WHERE id = ? AND tasks_truncated = 0", (run["id"],))
        return
    conn.execute(UPSERT_TASK, [run["id"], task_id, status] + [keep(trace.get(name)) for name, _, keep in TASK_FIELDS])


def text_or_none(value):
    """A text a weblog post reports, cut to MAX_WEBLOG_TEXT characters; None for anything else."""
    return value[:MAX_WEBLOG_TEXT] if isinstance(value, str) else None


def epoch_ms(value):
    return value if is_int(value) and value > 0 else None


def amount(value):
    """Bytes, milliseconds or a count."""
    return value if is_int(value) and value >= 0 else None


def percent(value):
    if is_int(value) or isinstance(value, float) and math.isfinite(value):  # json reads 1e999 as inf
        return float(value) if value >= 0 else None
    return None


def exit_status(value):
    return value if is_int(value) and value != NEXTFLOW_UNKNOWN_EXIT else None


def job_id(value):
    """The executor's id of the task: a number (the local PID) or a grid job id such as "4507361.pbs"."""
    return str(value) if is_int(value) else text_or_none(value)


# Nextflow's trace field, its column in `tasks`, and how a value is kept (None: not something the
# field can be). Units are Nextflow's: epoch milliseconds, milliseconds, bytes, percent.
TASK_FIELDS = (
    ("name", "name", text_or_none), ("process", "process", text_or_none), ("tag", "tag", text_or_none),
    ("hash", "hash", text_or_none), ("native_id", "native_id", job_id), ("attempt", "attempt", amount),
    ("exit", "exit", exit_status), ("submit", "submit", epoch_ms), ("start", "start", epoch_ms),
    ("complete", "complete", epoch_ms), ("duration", "duration", amount), ("realtime", "realtime", amount),
    ("%cpu", "pcpu", percent), ("%mem", "pmem", percent), ("peak_rss", "peak_rss", amount),
    ("peak_vmem", "peak_vmem", amount), ("rchar", "rchar", amount), ("wchar", "wchar", amount),
    ("read_bytes", "read_bytes", amount), ("write_bytes", "write_bytes", amount), ("cpus", "cpus", amount),
    ("memory", "memory", amount), ("time", "time", amount), ("disk", "disk", amount), ("queue", "queue", text_or_none),
    ("container", "container", text_or_none), ("hostname", "hostname", text_or_none),
    ("error_action", "error_action", text_or_none), ("workdir", "workdir", text_or_none),
)


def status_rank_sql(column):
    return "CASE %s %s END" % (column, " ".join("WHEN '%s' THEN %d" % item for item in TASK_STATUS_RANK.items()))


UPSERT_TASK = """
    INSERT INTO tasks (run_id, task_id, status, %(columns)s) VALUES (?, ?, ?, %(marks)s)
    ON CONFLICT (run_id, task_id) DO UPDATE SET status = excluded.status, %(updates)s
    WHERE excluded.status = tasks.status OR (%(old)s < 3 AND %(new)s >= %(old)s)
""" % {"columns": ", ".join(column for _, column, _ in TASK_FIELDS), "marks": ", ".join("?" for _ in TASK_FIELDS),
       "updates": ", ".join("%s = coalesce(excluded.%s, tasks.%s)" % ((column,) * 3) for _, column, _ in TASK_FIELDS),
       "old": status_rank_sql("tasks.status"), "new": status_rank_sql("excluded.status")}


# ==== Nextflow's trace file ====
# Nextflow never retries a weblog post (NEXTFLOW.md 1.5): a post sent while the server was down or
# restarting is gone, and its task would stay RUNNING for ever. The trace file Nextflow writes in
# the run folder (trace.raw, see run_config) is the authoritative record: when the worker reports
# the end of a run, its tasks are brought to what the file says, through record_task as a weblog
# post would be, so a task never moves backwards. Tasks the file leaves SUBMITTED or RUNNING stay so:
# Nextflow itself wrote them that way at the end (a task kept running with
# -disable-jobs-cancellation, or one nextflow did not get to kill), so nfapi cannot know more.

TRACE_NUMBER_FIELDS = {"task_id", "exit", "attempt", "submit", "start", "complete", "duration", "realtime", "%cpu",
                       "%mem", "peak_rss", "peak_vmem", "rchar", "wchar", "read_bytes", "write_bytes", "cpus",
                       "memory", "time", "disk"}
TRACE_NUMBER = re.compile(r"-?[0-9]{1,19}(\.[0-9]{1,19}([eE]-?[0-9]{1,3})?)?")  # Java's Long and Float texts


def reconcile_tasks(req, workflow_id, run_id, claim_secret):
    """Bring the tasks of a running run to its trace file. Tasks already final are not read again;
    the file is read outside any transaction, and what it changes is written TRACE_BATCH rows at a time."""
    with req.db() as conn:
        run = claimed_run(conn, run_id, claim_secret, workflow_id)
        if run["status"] != "running":
            return
        settled = {row[0] for row in conn.execute(
            "SELECT task_id FROM tasks WHERE run_id = ? AND %s = 3" % status_rank_sql("status"), (run_id,))}
    rows = [row for row in read_trace(req.app, run_id)
            if row.get("task_id") not in settled]
    for start in range(0, len(rows), TRACE_BATCH):
        with req.app.db.write() as conn:
            for row in rows[start:start + TRACE_BATCH]:
                # The run is read for each row: record_task counts its tasks against max_tasks_per_run.
                record_task(req.app, conn, weblog_run(conn, workflow_id, run_id), row)
    if any(row.get("status") == "FAILED" for row in rows):
        remember_failed_tasks(req.app, run)


def read_trace(app, run_id):
    """Yield the rows of the run's trace file as dicts keyed by its header's field names, raw numbers
    as numbers and `-` as None. The pipeline writes in the run folder too: a link or a FIFO is not
    read (see open_below), nor more than MAX_TRACE_BYTES. A row whose columns do not match the header
    (a tab in a tag) or that nextflow had not finished writing is left out."""
    try:
        fd = app.open_run_file(run_id, TRACE_FILE).detach()
    except OSError:
        return  # no trace: nextflow did not start
    header, left = None, MAX_TRACE_BYTES
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        while True:
            line = f.readline(min(left, MAX_TRACE_LINE_BYTES))
            left -= len(line)
            if not line.endswith(b"\n"):
                return
            values = line[:-1].decode("utf-8", "replace").split("\t")
            if header is None:
                header = values
            elif len(values) == len(header):
                yield {name: trace_value(name, value) for name, value in zip(header, values)}


def trace_value(name, text):
    if text == "-":
        return None
    if name not in TRACE_NUMBER_FIELDS:
        return text
    if not TRACE_NUMBER.fullmatch(text):
        return None
    return float(text) if "." in text else int(text)


# ==== Worker protocol ====
# A claim gives the worker the run and a claim secret. The worker confirms the claim with its first
# heartbeat before it starts nextflow; a claim not confirmed within `claim_confirm_seconds` goes back
# to the queue (App.requeue_unconfirmed_claims). Heartbeats, `finished` and `release` must show the
# claim secret. A run whose heartbeats stop for a lease is `lost` for good (App.reap_lost_runs).

# How a claimed run goes back to the queue, as if it had never been claimed.
REQUEUE = ("status = 'queued', worker = NULL, started_at = NULL, lease_until = NULL, command = NULL, "
           "claim_secret = NULL, confirmed_at = NULL")


def worker_claim(req):
    """Long-poll for a queued run: answer `{"run": launch}` at once when there is one, else wait up
    to `wait` seconds for one to be scheduled, then answer `{"run": null}`. A worker that closes the
    connection withdraws its poll: nothing is claimed for it after that."""
    body = req.json()
    worker = body.get("worker")
    if not isinstance(worker, str) or not 1 <= len(worker) <= 200:
        raise ApiError(422, "worker", "must be a string of 1 to 200 characters")
    wait = body.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_CLAIM_WAIT:
        raise ApiError(422, "wait", "must be a number of seconds from 0 to %d" % MAX_CLAIM_WAIT)
    host = weblog_host(req)
    record_worker(req.app, worker, worker_description(body))
    deadline = time.monotonic() + wait
    while True:
        generation = req.app.changes.generation
        launch, held_until = claim_next_run(req.app, worker, host)
        remaining = deadline - time.monotonic()
        if launch:
            req.app.changes.notify(launch["workflow_id"])
        if launch or remaining <= 0:
            return 200, {"run": launch}
        if held_until is not None:
            remaining = min(remaining, max(0.01, held_until - time.time()))
        req.app.changes.wait([QUEUED_RUNS], generation, remaining)
        if req.app.stopping.is_set():
            raise ApiError(503, "general", "the server is stopping; try again")
        if client_left(req.conn.connection):
            raise ClientGone()


def client_left(sock):
    """Whether the client closed its end of the connection (bytes it sent stay unread)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:
        return True


def weblog_host(req):
    """Nextflow runs beside the worker, so it reaches the server the way the worker did: its Host.
    A worker on the Unix socket is on this node, and its Host (localhost) names no TCP port of
    ours: Nextflow then gets the address we listen on."""
    if req.over_unix_socket():
        return tcp_address(req.conn.server)
    host = req.headers.get("host", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
        raise ApiError(400, "Host", "a Host header is needed to build the weblog URL")
    return host


def claim_next_run(app, worker, host):
    """Atomically move the oldest queued run that may start to running for `worker`.

    Returns (its launch spec, None), or (None, when a run held back by startable_run may start, or None).
    """
    now = time.time()
    with app.db.write() as conn:
        while True:
            run, held_until = startable_run(conn, now, app.config["lease_seconds"])
            if run is None:
                return None, held_until
            pipeline = app.config["pipelines"].get(run["pipeline"])
            if pipeline is None:
                conn.execute("UPDATE runs SET status = 'failed', finished_at = ?, error_message = ? WHERE id = ?",
                             (now, "the pipeline %r is no longer configured" % run["pipeline"], run["id"]))
                queue_notifications(app, conn, [run["id"]])
                continue
            launch = launch_spec(app, run, as_scheduled(pipeline, run), host)
            launch.update(claim_secret=secrets.token_urlsafe(24),
                          claim_confirm_seconds=app.config["claim_confirm_seconds"])
            claimed = conn.execute(
                "UPDATE runs SET status = 'running', worker = ?, started_at = ?, lease_until = ?, command = ?, "
                "claim_secret = ?, confirmed_at = NULL WHERE id = ? AND status = 'queued'",
                (worker, now, now + app.config["lease_seconds"], json.dumps(launch["argv"]), launch["claim_secret"],
                 run["id"])).rowcount
            if claimed == 1:
                return launch, None


QUEUED_RUNS_SQL = """
    SELECT r.*, (SELECT max(l.finished_at) FROM runs l WHERE l.workflow_id = r.workflow_id AND l.status = 'lost'
                 AND l.late_report IS NULL) AS lost_at
    FROM runs r WHERE r.status = 'queued' ORDER BY r.id
"""


def startable_run(conn, now, hold):
    """The oldest queued run that may start, and when the first one held back may (None if none is).

    A `lost` run's nextflow may still be running in the workflow's launch folder (its worker was
    paused, or cut off). The workflow's next run waits until that worker reports the end (late_report)
    or for `hold` seconds; after that, the worker's lock on the launch folder decides.
    """
    held_until = None
    for run in conn.execute(QUEUED_RUNS_SQL).fetchall():
        if run["lost_at"] is None or run["lost_at"] + hold <= now:
            return run, None
        held_until = min(held_until or math.inf, run["lost_at"] + hold)
    return None, held_until


def launch_spec(app, run, pipeline, host):
    """Everything a worker needs to start nextflow; user values are only in `params`, never in argv.

    The worker writes `config` to `config_file` for Nextflow 23.10 and later, `config_url_token`
    (the secret in the weblog URL) for older ones: only it knows which Nextflow it runs."""
    workflow_id, run_id = run["workflow_id"], run["id"]
    run_dir = app.run_dir(run_id)
    params_file, config_file = os.path.join(run_dir, "params.json"), os.path.join(run_dir, RUN_CONFIG)
    weblog = "http://%s/api/workflows/%d/nextflow-log?run=%s" % (host, workflow_id, run_id)
    launch_dir = app.launch_dir(workflow_id)
    argv = ["run", pipeline.get("script") or pipeline.get("pipeline")]
    if "revision" in pipeline:
        argv += ["-r", pipeline["revision"]]
    argv += ["-params-file", params_file, "-name", "nfapi-run-%s" % run_id,
             "-work-dir", os.path.join(launch_dir, "work"), "-ansi-log", "false"]
    # nfapi's config last: a -c file of the pipeline's nextflow_parameters cannot turn its settings off.
    argv += pipeline["nextflow_parameters"] + ["-c", config_file]
    if run["resume_session"]:
        argv += ["-resume", run["resume_session"]]
    return {"run_id": run_id, "workflow_id": workflow_id, "argv": argv, "cwd": launch_dir,
            "params": json.loads(run["params"]), "params_file": params_file, "run_dir": run_dir,
            "config_file": config_file, "config": run_config(run_dir, weblog, run["secret"], True),
            "config_url_token": run_config(run_dir, weblog, run["secret"], False),
            "console_log": os.path.join(run_dir, "console.log"), "lease_seconds": app.config["lease_seconds"],
            "nextflow_version": pipeline.get("nextflow_version")}


def as_scheduled(pipeline, run):
    """The pipeline with the revision and Nextflow version the run was queued with (a relaunch repeats
    those of the run it repeats); the configuration's for runs queued before they were recorded."""
    pipeline = dict(pipeline)
    if run["revision"] and "pipeline" in pipeline:
        pipeline["revision"] = run["revision"]
    if run["pinned_nextflow_version"]:
        pipeline["nextflow_version"] = run["pinned_nextflow_version"]
    return pipeline


def worker_check(req):
    """What `nfapi_worker.py --check` compares with what its node sees: the data folder's paths, and
    what each pipeline needs to launch."""
    app = req.app
    pipelines = {name: {key: pipeline[key] for key in ("script", "pipeline", "revision", "nextflow_version")
                        if key in pipeline}
                 for name, pipeline in app.config["pipelines"].items()}
    # The data folder's inode tells the worker whether the folder at that path on its node is this one.
    return 200, {"data_dir": app.data_dir, "data_dir_inode": os.stat(app.data_dir).st_ino,
                 "workflows_dir": os.path.dirname(app.workflow_dir(0)),
                 "launch_dir": os.path.dirname(app.launch_dir(0)), "runs_dir": os.path.dirname(app.run_dir(0)),
                 "pipelines": pipelines}


def worker_release(req):
    """A worker that claimed a run while stopping gives it back to the queue (it started nothing)."""
    body = req.json()
    if not is_int(body.get("run_id")):
        raise ApiError(422, "run_id", "give the run_id and claim_secret of the claim")
    with req.app.db.write() as conn:
        claimed_run(conn, body["run_id"], body.get("claim_secret"))
        released = conn.execute("UPDATE runs SET %s WHERE id = ? AND status = 'running'" % REQUEUE,
                                (body["run_id"],)).rowcount
    if not released:
        raise ApiError(409, "run_id", "that run is not running")
    req.app.changes.notify(QUEUED_RUNS)
    return 200, {}


def worker_heartbeat(req):
    """Extend the lease of the runs a worker holds (the first heartbeat of a claim confirms it).
    Answer which to cancel, and which are not the worker's any more (`gone`: stop that nextflow)."""
    claims = req.json().get("runs")
    if not isinstance(claims, list) or len(claims) > 1000 or not all(
            isinstance(c, dict) and is_int(c.get("run_id")) and isinstance(c.get("claim_secret"), str) for c in claims):
        raise ApiError(422, "runs", "must be a list of {run_id, claim_secret}, one for each run the worker holds")
    cancel, gone, workers = [], [], set()
    if not claims:
        return 200, {"cancel": cancel, "gone": gone}
    now = time.time()
    with req.app.db.write() as conn:
        for claim in claims:
            run = conn.execute("SELECT status, claim_secret, cancel_requested, worker FROM runs WHERE id = ?",
                               (claim["run_id"],)).fetchone()
            if run is None or run["status"] != "running" or not holds_claim(run, claim["claim_secret"]):
                gone.append(claim["run_id"])
                continue
            conn.execute("UPDATE runs SET lease_until = ?, confirmed_at = coalesce(confirmed_at, ?) WHERE id = ?",
                         (now + req.app.config["lease_seconds"], now, claim["run_id"]))
            workers.add(run["worker"])
            if run["cancel_requested"]:
                cancel.append(claim["run_id"])
        # The runs a worker holds name it: a busy worker is seen by its heartbeats.
        conn.execute("UPDATE workers SET last_seen = ? WHERE name IN (%s)" % ", ".join("?" * len(workers)),
                     [now] + sorted(workers))
    return 200, {"cancel": cancel, "gone": gone}


# ==== Workers ====
# Who is working: each claim records its worker (name, host, pid, slots, Nextflow version) and when
# it was seen; heartbeats update that time. A user learns that no worker is there from
# GET /api/workers and from a queued run's `waiting_for` (see worker_absent_before).

WORKERS_SHOWN_SECONDS = 3600


def worker_description(body):
    """(host, pid, slots, nextflow_version) from a claim; each null when a worker does not send it."""
    checks = (("host", str, 1, 255, "a host name of 1 to 255 characters"),
              ("pid", int, 1, 2 ** 31 - 1, "a process id"),
              ("slots", int, 1, 10 ** 6, "the number of runs the worker runs at once"),
              ("nextflow_version", str, 1, 100, "the version `nextflow -version` printed, such as 24.10.0"))
    values = []
    for key, kind, low, high, what in checks:
        value = body.get(key)
        size = len(value) if kind is str and isinstance(value, str) else value
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool) and low <= size <= high):
            raise ApiError(422, key, "must be %s, or null" % what)
        values.append(value)
    return tuple(values)


def record_worker(app, name, description):
    """Remember a worker as seen now; workers not seen for WORKERS_SHOWN_SECONDS are forgotten."""
    now = time.time()
    with app.db.write() as conn:
        conn.execute("DELETE FROM workers WHERE last_seen < ?", (now - WORKERS_SHOWN_SECONDS,))
        conn.execute("INSERT INTO workers (name, host, pid, slots, nextflow_version, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                     "ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, slots = excluded.slots, "
                     "nextflow_version = excluded.nextflow_version, last_seen = excluded.last_seen",
                     (name,) + description + (now,))


def workers_list(req):
    """The workers seen in the last hour, the most recently seen first, with the runs they hold.
    `connected`: seen within `worker_absent_seconds` (an idle worker claims every 20 s)."""
    now = time.time()
    with req.db() as conn:
        rows = conn.execute("SELECT * FROM workers WHERE last_seen >= ? ORDER BY last_seen DESC, name",
                            (now - WORKERS_SHOWN_SECONDS,)).fetchall()
        held = collections.defaultdict(list)
        for run in conn.execute("SELECT worker, id FROM runs WHERE status = 'running' ORDER BY id"):
            held[run["worker"]].append(run["id"])
    absent_before = now - req.app.config["worker_absent_seconds"]
    return 200, {"workers": [{"name": row["name"], "host": row["host"], "pid": row["pid"], "slots": row["slots"],
                              "nextflow_version": row["nextflow_version"], "runs": held[row["name"]],
                              "last_seen": row["last_seen"], "connected": row["last_seen"] >= absent_before}
                             for row in rows]}


# ==== Runs, logs and downloads ====

def run_row(conn, workflow_id, run_id):
    """The run `run_id` of the workflow, or its latest run when run_id is None; 404 when there is none."""
    workflow_row(conn, workflow_id)
    if run_id is None:
        row = conn.execute("SELECT * FROM runs WHERE workflow_id = ? ORDER BY id DESC LIMIT 1", (workflow_id,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM runs WHERE workflow_id = ? AND id = ?", (workflow_id, run_id)).fetchone()
    if row is None:
        raise ApiError(404, "run", "no such run for this workflow")
    return row


def workflow_runs(req, id):
    """The workflow's runs, newest first."""
    offset, limit = req.query_int("offset", 0), req.query_int("limit", -1)
    with req.db() as conn:
        workflow_row(conn, id)
        rows = conn.execute("SELECT * FROM runs WHERE workflow_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
                            (id, limit, offset)).fetchall()
        absent_before = worker_absent_before(req.app, conn)
    return 200, {"runs": [run_json(row, row["id"], absent_before) for row in rows]}


def workflow_run(req, id, run_id):
    """One run of the workflow; `?wait=<seconds>`: once it has ended."""
    return 200, {"run": answer_when_ended(req, id, lambda conn: run_json(
        run_row(conn, id, run_id), run_id, worker_absent_before(req.app, conn)))}


def workflow_run_relaunch(req, id, run_id):
    """Queue the run again as it was: its pipeline, revision, Nextflow version, arguments and params,
    not the workflow's current ones. `{"resume": true}` resumes that run's Nextflow session."""
    resume = req.json().get("resume", False)
    if not isinstance(resume, bool):
        raise ApiError(422, "resume", "must be true or false")
    with req.db() as conn:
        old = run_row(conn, id, run_id)
        refuse_if_active(conn, id, "relaunch a run")
    pipeline = req.app.config["pipelines"].get(old["pipeline"])
    if pipeline is None:
        raise ApiError(422, "run", "the pipeline %r is no longer configured: this run cannot be repeated; choose a "
                                   "pipeline and schedule the workflow instead" % old["pipeline"])
    if old["params"] is None:
        raise ApiError(422, "run", "this run is older than the record of its params: schedule the workflow instead")
    check_launchable(req.app, id, json.loads(old["arguments"]))
    session = old["session_id"] if resume else None
    if resume and not matches(SESSION_ID, session):
        raise ApiError(422, "resume", "this run has no Nextflow session to resume (Nextflow never reported one)")
    with req.app.db.write() as conn:
        workflow_row(conn, id)
        refuse_if_active(conn, id, "relaunch a run")
        new_id = queue_run(conn, id, pipeline=old["pipeline"], arguments=old["arguments"], params=old["params"],
                           resume=int(resume), resume_session=session, **as_it_ran(old, pipeline))
        run = run_json(conn.execute("SELECT * FROM runs WHERE id = ?", (new_id,)).fetchone(), new_id, None)
    req.app.changes.notify(id, QUEUED_RUNS)
    return 200, {"run": run}


def as_it_ran(run, pipeline):
    """The revision and Nextflow version that repeat `run`: what ran, as its `started` post reported it
    (the commit of a remote pipeline, the Nextflow version), else what it asked for."""
    commit = run["commit_id"] if "pipeline" in pipeline else None
    version = run["nextflow_version"] if matches(PINNED_VERSION, run["nextflow_version"]) else None
    return {"revision": commit or run["revision"],
            "pinned_nextflow_version": version or run["pinned_nextflow_version"]}


def workflow_run_tasks(req, id, run_id):
    """The run's tasks as reported by Nextflow's weblog, by task id, a page at a time (`limit`, 1000 by
    default); `next_offset` is the `offset` of the next page, null after the last. `?status=FAILED` (or
    `failed`) filters."""
    status = req.query_str("status", None)
    if status is not None:
        status = status.upper()  # tasks are FAILED, runs are failed: a script should not have to care
    if status is not None and status not in TASK_STATUS_RANK:
        raise ApiError(422, "status", "must be one of %s" % ", ".join(TASK_STATUS_RANK))
    offset, limit = page_bounds(req)
    with req.db() as conn:
        run_row(conn, id, run_id)
        rows = conn.execute("SELECT * FROM tasks WHERE run_id = ? AND (? IS NULL OR status = ?) "
                            "ORDER BY task_id LIMIT ? OFFSET ?", (run_id, status, status, limit + 1, offset)).fetchall()
    return 200, {"tasks": [task_json(row) for row in rows[:limit]],
                 "next_offset": offset + limit if len(rows) > limit else None}


def page_bounds(req):
    """(`offset`, `limit`) of a page of a run's tasks or processes: a forged weblog post adds rows,
    and no answer may grow with them."""
    offset, limit = req.query_int("offset", 0), req.query_int("limit", TASKS_PAGE)
    if not 1 <= limit <= MAX_TASKS_PAGE:
        raise ApiError(422, "limit", "must be from 1 to %d" % MAX_TASKS_PAGE)
    return offset, limit


def task_json(row):
    """A task under Nextflow's trace field names; null for what Nextflow did not report."""
    task = {"task_id": row["task_id"], "status": row["status"]}
    task.update((name, row[column]) for name, column, _ in TASK_FIELDS)
    return task


def workflow_log(req, id):
    """A run's console output (or `file=nextflow`: its .nextflow.log) as text from byte `offset`.

    `X-Next-Offset` says where to continue and `X-Run-Status` whether more may come, so a client
    can follow a live run: ask again from X-Next-Offset until the status is final. The run's weblog
    secret and the API tokens are masked with `*`, byte for byte.
    """
    which = req.query_str("file", "console")
    if which not in ("console", "nextflow"):
        raise ApiError(422, "file", "must be console or nextflow")
    offset = req.query_int("offset", 0)
    with req.db() as conn:
        run = run_row(conn, id, req.query_int("run", None))
    data, size = read_log(req.app, run, which, offset)
    return 200, Body.of({"Content-Type": "text/plain; charset=utf-8", "X-Next-Offset": str(offset + len(data)),
                         "X-Log-Size": str(size), "X-Run-Status": run["status"], "X-Run-Id": str(run["id"])}, data)


def open_run_log(app, run, which):
    """The run's console log or .nextflow.log (`which`), see open_below."""
    if which == "console":
        return app.open_run_file(run["id"], "console.log")
    # The worker keeps each run's .nextflow.log in the run folder when nextflow ends; until then
    # the live one is in the launch folder.
    try:
        return app.open_run_file(run["id"], "nextflow.log")
    except FileNotFoundError:
        if run["status"] != "running":
            raise
    return app.open_launch_file(run["workflow_id"], ".nextflow.log")


def read_log(app, run, which, offset):
    """(up to LOG_CHUNK_BYTES of the run's log from `offset` with its secrets masked, the log's size).

    Nextflow and the pipeline write in the launch folder, so the log is opened without following a
    link or waiting for a FIFO's writer, and served only if it is a regular file.
    """
    try:
        log = open_run_log(app, run, which)
    except FileNotFoundError:
        if offset:
            raise ApiError(416, "offset", "the log is empty")
        return b"", 0
    except OSError:
        raise not_a_log()
    with log as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_a_log()
        return read_masked(fd, st.st_size, offset, log_secrets(app, run), run["status"] in ACTIVE_RUN_STATES), st.st_size


def read_masked(fd, size, offset, secrets, growing):
    """Up to LOG_CHUNK_BYTES of the open file `fd` of `size` bytes from `offset`, with `secrets` masked.

    Masks keep the length, so offsets stay true. The bytes read around the chunk catch a secret across
    its edges; while the file is `growing`, an end that could be the start of a secret is held back.
    """
    if offset > size:
        raise ApiError(416, "offset", "the file has only %d bytes" % size)
    margin = max(len(secret) for secret in secrets) - 1
    start = max(0, offset - margin)
    wanted = offset - start + LOG_CHUNK_BYTES + margin
    window = mask_secrets(os.pread(fd, wanted, start), secrets)
    end = len(window)
    if growing and end < wanted:
        end -= max((n for secret in secrets for n in range(1, len(secret)) if window.endswith(secret[:n])), default=0)
    return window[offset - start:min(end, offset - start + LOG_CHUNK_BYTES)]


def not_a_log():
    return ApiError(409, "file", "the log is not a regular file (a link, a FIFO...), so it is not served")


def log_secrets(app, run):
    """What no log may show: the run's weblog secret and the API tokens."""
    return [secret.encode() for secret in (run["secret"], app.token, app.read_token) if secret]


def mask_secrets(data, secrets):
    """`data` (bytes or text) with each of `secrets` (bytes) replaced by as many `*`."""
    text = isinstance(data, str)
    if text:
        data = data.encode("utf-8", "surrogateescape")
    for secret in secrets:
        data = data.replace(secret, b"*" * len(secret))
    return data.decode("utf-8", "surrogateescape") if text else data


def workflow_download(req, id):
    """A file (zero-copy with sendfile, single Range requests, ETag) or a folder as a streamed archive."""
    names = path_names(req.query_str("path", ""), "path")
    fmt = req.query_str("format", "zip")
    if fmt not in ARCHIVE_FORMATS:
        raise ApiError(422, "format", "must be zip or tar.gz")
    with req.app.open_workflow_folder(id) as root:
        if not names:
            return folder_archive(open_folder(root, [], "path"), "workflow-%d" % id, fmt)
        with open_folder(root, names[:-1], "path") as folder:
            entry, st = open_entry(folder, names[-1], "path")
    if stat.S_ISDIR(st.st_mode):
        return folder_archive(entry, names[-1], fmt)
    return file_download(req, os.fdopen(entry.detach(), "rb"), names[-1])


def file_download(req, f, name):
    st = os.fstat(f.fileno())
    etag = '"%x-%x"' % (st.st_mtime_ns, st.st_size)
    headers = {"Content-Type": "application/octet-stream", "Content-Disposition": attachment(name), "ETag": etag,
               "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True), "Accept-Ranges": "bytes"}
    if req.headers.get("if-none-match") == etag:
        f.close()
        return 304, Body.of(headers, b"")
    status, start, length = 200, 0, st.st_size
    wanted = byte_range(req.headers.get("range"), st.st_size)
    if wanted:
        start, end = wanted
        status, length = 206, end - start + 1
        headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, st.st_size)

    def send(handler):
        with f:
            handler.wfile.flush()
            send_file(handler.connection, f, start, length)
    return status, Body(headers, length, send)


def send_file(sock, f, offset, length):
    """Zero-copy; on the blocking socket, a client that stops reading ends it with SO_SNDTIMEO."""
    while length:
        sent = os.sendfile(sock.fileno(), f.fileno(), offset, min(length, 1 << 30))
        if not sent:
            raise ConnectionAbortedError("the file shrank while it was being sent")
        offset, length = offset + sent, length - sent


def byte_range(header, size):
    """The (first, last) byte of a single `Range: bytes=...` (RFC 9110 14.2), None to send it all.

    Several ranges or a malformed header are ignored (allowed by the RFC); an unsatisfiable one is 416.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*", header or "")
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            start = size
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    if start >= size:
        raise ApiError(416, "Range", "the file has %d bytes" % size, {"Content-Range": "bytes */%d" % size})
    return start, end


def attachment(name):
    """Content-Disposition with an ASCII fallback and the exact UTF-8 name (RFC 6266, RFC 8187)."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", name)
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (fallback, urllib.parse.quote(name, safe=""))


def folder_archive(folder, base, fmt):
    """Stream the folder (a Descriptor) as zip or tar.gz while walking it: nothing is built in memory
    or on disk. Only regular files and folders go in (see archive_entries)."""
    headers = {"Content-Type": "application/zip" if fmt == "zip" else "application/gzip",
               "Content-Disposition": attachment("%s.%s" % (base, fmt))}

    def send(handler):
        with folder:
            out = ChunkedWriter(handler.wfile)
            if fmt == "zip":
                with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                    for name, f, st in archive_entries(folder.fd, base, utf8_only=True):
                        add_to_zip(archive, name, f, st)
            else:
                # Names that are not UTF-8 keep their bytes (a pax header with hdrcharset=BINARY).
                with tarfile.open(fileobj=out, mode="w|gz", encoding="utf-8", errors="surrogateescape") as archive:
                    for name, f, st in archive_entries(folder.fd, base, utf8_only=False):
                        add_to_tar(archive, name, f, st)
            out.close()
    return 200, Body(headers, None, send)


def archive_entries(folder, prefix, utf8_only, depth=0):
    """(name, open file or None for a folder, stat) for the folder descriptor `folder` and everything
    in it, walked by descriptor without following symlinks: a folder, its files, then its folders.

    Left out, so that a download never fails half-way: symlinks, FIFOs, devices and sockets, entries
    that vanish during the walk, names that are not UTF-8 when `utf8_only` (zip), and folders deeper
    than MAX_ARCHIVE_DEPTH; the last two with a note in the server log.
    """
    yield prefix + "/", None, os.fstat(folder)
    if depth == MAX_ARCHIVE_DEPTH:
        sys.stderr.write("nfapi: left the contents of %s out of an archive: deeper than %d folders\n"
                         % (ascii(prefix), MAX_ARCHIVE_DEPTH))
        return
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    if utf8_only:
        for e in entries:
            if not is_utf8(e.name):
                sys.stderr.write("nfapi: left %s out of a zip archive: its name is not UTF-8\n"
                                 % ascii(os.fsencode(prefix + "/" + e.name)))
        entries = [e for e in entries if is_utf8(e.name)]
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError), open(os.open(entry.name, ENTRY_FLAGS, dir_fd=folder), "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode):
                    yield prefix + "/" + entry.name, f, st
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError), Descriptor(os.open(entry.name, FOLDER_FLAGS, dir_fd=folder)) as sub:
                yield from archive_entries(sub, prefix + "/" + entry.name, utf8_only, depth + 1)


def add_to_zip(archive, name, f, st):
    info = zipfile.ZipInfo(name, zip_time(st.st_mtime))
    info.external_attr = (st.st_mode & 0xFFFF) << 16
    if f is None:
        info.external_attr |= 0x10  # the MS-DOS folder flag
        archive.writestr(info, b"")
        return
    info.file_size = st.st_size  # lets zipfile choose ZIP64 for a large file, as archive.write does
    with archive.open(info, "w") as out:
        shutil.copyfileobj(f, out, READ_CHUNK)


def zip_time(mtime):
    """A zip entry's local date and time: zip can store the years 1980 to 2107 only."""
    moment = time.localtime(min(max(mtime, 0), 2 ** 32))[:6]
    return min(max(moment, (1980, 1, 1, 0, 0, 0)), (2107, 12, 31, 23, 59, 58))


def add_to_tar(archive, name, f, st):
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = st.st_mtime, stat.S_IMODE(st.st_mode)
    if f is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = st.st_size
    archive.addfile(info, f)


def openapi_json(req):
    """This API as an OpenAPI 3.1 document."""
    return 200, OPENAPI


def pipelines_list(req):
    """The configured pipelines' names, sorted."""
    return 200, {"nextflow_workflows": sorted(req.app.config["pipelines"])}


def pipeline_arguments(req, name):
    """A pipeline's dynamic arguments as configured."""
    pipeline = req.app.config["pipelines"].get(name)
    if pipeline is None:
        raise ApiError(404, "nextflow_workflow", "no pipeline named %r" % name)
    return 200, {"arguments": pipeline["dynamic"]}


# ==== Webhooks and e-mail ====
# When a run reaches a final state the server tells what the operator configured in `notify`: each
# webhook gets a signed JSON POST, the e-mail recipients one message. The transaction that makes a run
# final queues one `deliveries` row per channel (queue_notifications), so a restart neither loses one
# nor queues it twice. One thread (Courier) sends them, so no request and no weblog post ever waits for
# a receiver, and tries a failed one again after each wait of `retry_after_seconds`. An attempt is
# counted before it is made: one cut off by a restart is made again, so a receiver may get a delivery
# twice only if the server died between sending it and recording that it was sent; X-Nfapi-Delivery
# lets it drop the repeat.

NOTIFY_TIMEOUT = 30  # seconds for one attempt (connect, send, answer)


class DeliveryFailed(Exception):
    """A receiver refused a notification; the message says how."""


def queue_notifications(app, conn, run_ids):
    """Queue the notifications of runs made final in this transaction (call it in that transaction)."""
    notify, now = app.config["notify"], time.time()
    targets = [("webhook", hook["url"]) for hook in notify["webhooks"]]
    for run_id in run_ids:
        recipients = email_recipients(conn, notify["email"], run_id)
        conn.executemany("INSERT OR IGNORE INTO deliveries (run_id, channel, target, next_at) VALUES (?, ?, ?, ?)",
                         [(run_id, channel, target, now) for channel, target in
                          targets + ([("email", ", ".join(recipients))] if recipients else [])])
    if run_ids and (targets or notify["email"]):
        # The courier picks deliveries up in a write transaction of its own, so it sees these once
        # this one has committed.
        app.courier.wake.set()


def email_recipients(conn, mail, run_id):
    """The configured recipients and the run's workflow's own, each once; none without e-mail configured."""
    if mail is None:
        return []
    row = conn.execute("SELECT w.notify_email FROM runs r JOIN workflows w ON w.id = r.workflow_id WHERE r.id = ?",
                       (run_id,)).fetchone()
    return list(dict.fromkeys(mail["to"] + json.loads(row["notify_email"])))


class Courier:
    """The one thread that sends notifications. It sleeps until one is queued (`wake`) or a retry is due."""

    def __init__(self, app):
        self.app = app
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self.deliver_forever, name="notifications", daemon=True)

    def finish(self, timeout=5.0):
        """Let a stopping server's attempt in progress end and be recorded, for up to `timeout` seconds."""
        self.wake.set()
        self.thread.join(timeout)

    def deliver_forever(self):
        while not self.app.stopping.is_set():
            self.wake.clear()
            try:
                pause = self.deliver_due()
            except sqlite3.Error:
                if not self.app.stopping.is_set():  # else finish() gave up on an attempt: it is made after a restart
                    traceback.print_exc()
                pause = 5.0
            self.wake.wait(pause)

    def deliver_due(self):
        """Make the attempts that are due; return the seconds until the next one is (None: none waits)."""
        while not self.app.stopping.is_set():
            delivery = self.claim_due()
            if delivery is None:
                break
            self.record(delivery, self.attempt(delivery))
        with self.app.db.connection() as conn:
            next_at = conn.execute("SELECT min(next_at) FROM deliveries WHERE status = 'pending'").fetchone()[0]
        return None if next_at is None else max(0.0, next_at - time.time())

    def claim_due(self):
        """The oldest delivery due, with this attempt counted and the next one scheduled; None if none is."""
        waits, now = self.app.config["notify"]["retry_after_seconds"], time.time()
        with self.app.db.write() as conn:
            delivery = conn.execute("SELECT * FROM deliveries WHERE status = 'pending' AND next_at <= ? "
                                    "ORDER BY next_at, id LIMIT 1", (now,)).fetchone()
            if delivery is not None:
                conn.execute("UPDATE deliveries SET attempts = attempts + 1, next_at = ? WHERE id = ?",
                             (now + waits[min(delivery["attempts"], len(waits) - 1)], delivery["id"]))
        return delivery

    def attempt(self, delivery):
        """Send one delivery; return None when the receiver took it, else why not."""
        notify = self.app.config["notify"]
        try:
            with self.app.db.connection() as conn:
                message = run_notification(self.app, conn, delivery["run_id"])
            if delivery["channel"] == "webhook":
                hook = next((h for h in notify["webhooks"] if h["url"] == delivery["target"]), None)
                if hook is None:
                    raise DeliveryFailed("this webhook is no longer in the configuration")
                post_webhook(hook, message, delivery["id"])
            elif notify["email"] is None:
                raise DeliveryFailed("e-mail is no longer in the configuration")
            else:
                send_email(notify["email"], delivery["target"].split(", "), message)
        except (OSError, http.client.HTTPException, subprocess.SubprocessError, DeliveryFailed, ApiError) as e:
            return (str(e) or type(e).__name__)[:MAX_WEBLOG_TEXT]
        except Exception:
            traceback.print_exc()  # a bug: the attempt fails like any other, the thread goes on
            return "nfapi could not send it (see the server's log)"
        return None

    def record(self, delivery, error):
        tries = len(self.app.config["notify"]["retry_after_seconds"]) + 1
        with self.app.db.write() as conn:
            if error is None:
                conn.execute("UPDATE deliveries SET status = 'sent', sent_at = ? WHERE id = ?",
                             (time.time(), delivery["id"]))
            else:
                conn.execute("UPDATE deliveries SET status = ?, last_error = ? WHERE id = ?",
                             ("failed" if delivery["attempts"] + 1 >= tries else "pending", error, delivery["id"]))


def run_notification(app, conn, run_id):
    """A webhook's body for a run that ended: the workflow, the run, and one line for chat tools."""
    row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise DeliveryFailed("the run was deleted")
    workflow, run = load_workflow(app, conn, row["workflow_id"]), run_json(row, run_id, None)
    return {"event": "run.finished", "workflow": workflow, "run": run, "text": summary_line(workflow, run)}


def summary_line(workflow, run):
    line = 'nfapi: run %d of workflow %d "%s" %s' % (run["id"], workflow["id"], one_line(workflow["name"], 100),
                                                      run["status"])
    if run["started_at"] and run["finished_at"]:
        line += " after %s" % duration_text(run["finished_at"] - run["started_at"])
    if run["status"] != "succeeded" and run["error_message"]:
        line += ": " + one_line(run["error_message"].strip().split("\n")[0], 200)
    return line


def one_line(text, limit):
    """`text` cut to `limit` characters, with nothing left that breaks a line or a header: control
    characters, and every line break str.splitlines knows (U+2028, U+2029, U+0085...), which the
    e-mail package refuses in a header."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]+", " ", text).splitlines())[:limit]


def duration_text(seconds):
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return "%d h %d min" % (hours, minutes)
    return "%d min %d s" % (minutes, secs) if minutes else "%d s" % secs


def post_webhook(hook, message, delivery_id):
    """POST the message as JSON, signed with the webhook's secret (HMAC-SHA256 of the exact body)."""
    body = json.dumps(message).encode()
    url = urllib.parse.urlsplit(hook["url"])
    connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(url.netloc, timeout=NOTIFY_TIMEOUT)
    try:
        conn.request("POST", urllib.parse.urlunsplit(("", "", url.path or "/", url.query, "")), body=body, headers={
            "Content-Type": "application/json", "User-Agent": "nfapi", "X-Nfapi-Event": message["event"],
            "X-Nfapi-Delivery": str(delivery_id),
            "X-Nfapi-Signature": "sha256=" + hmac.new(hook["secret"].encode(), body, "sha256").hexdigest()})
        status = conn.getresponse().status
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise DeliveryFailed("the webhook answered HTTP %d" % status)


def send_email(mail, recipients, message):
    """One message to all recipients, through the SMTP server or the sendmail program configured.
    sendmail reads the recipients from the message (-t): its command line is fixed."""
    msg = email_message(mail["from"], recipients, message)
    if "smtp" in mail:
        host, _, port = mail["smtp"].rpartition(":")
        try:
            with smtplib.SMTP(host.strip("[]"), int(port), timeout=NOTIFY_TIMEOUT) as smtp:
                smtp.send_message(msg)
        except smtplib.SMTPResponseException as e:
            answer = e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else e.smtp_error
            raise DeliveryFailed("the SMTP server answered %d %s" % (e.smtp_code, answer))
        return
    done = subprocess.run([mail["sendmail"], "-t", "-oi"], input=msg.as_bytes(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=NOTIFY_TIMEOUT)
    if done.returncode:
        raise DeliveryFailed("%s exited with %d: %s" % (mail["sendmail"], done.returncode,
                                                        done.stderr.decode("utf-8", "replace").strip()[-500:]))


def email_message(sender, recipients, message):
    workflow, run = message["workflow"], message["run"]
    msg = email.message.EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = "[nfapi] " + message["text"][len("nfapi: "):]
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("nfapi-run-%d" % run["id"], domain=sender.split("@")[1])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    facts = [("Workflow", '%d "%s"' % (workflow["id"], one_line(workflow["name"], 200))),
             ("Run", "%d, %s" % (run["id"], run["status"])), ("Pipeline", run["pipeline"]),
             ("Started", utc_text(run["started_at"])), ("Finished", utc_text(run["finished_at"])),
             ("Exit code", run["exit_code"]), ("Tasks", "%d submitted, %d completed, %d failed"
                                                         % (run["submitted"], run["completed"], run["failed"])),
             ("Nextflow", run["nextflow_version"]), ("Commit", run["commit_id"])]
    text = "\n".join("%-10s %s" % (name + ":", value) for name, value in facts if value is not None)
    if run["error_message"] and run["status"] != "succeeded":
        text += "\n\nError:\n" + run["error_message"]
    msg.set_content(text + "\n")
    return msg


def utc_text(moment):
    return None if moment is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def workflow_run_notifications(req, id, run_id):
    """What was sent when the run ended and what failed: one entry per webhook, one for e-mail."""
    with req.db() as conn:
        run_row(conn, id, run_id)
        rows = conn.execute("SELECT * FROM deliveries WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
    return 200, {"notifications": [delivery_json(row) for row in rows]}


def delivery_json(row):
    delivery = {key: row[key] for key in ("id", "channel", "target", "status", "attempts", "last_error", "sent_at")}
    delivery["next_at"] = row["next_at"] if row["status"] == "pending" else None
    if row["channel"] == "webhook":
        # Chat tools' webhook URLs carry their own secret in the path or the query.
        url = urllib.parse.urlsplit(row["target"])
        delivery["target"] = "%s://%s/..." % (url.scheme, url.netloc)
    return delivery


# ==== Inside a run ====
# What a user asks when a run fails or drags: which task failed and why (its files, the run's
# `failed_tasks`), what each process used (the processes view), and Nextflow's own report, timeline
# and trace file. A task's work folder comes from the weblog, so it is trusted only as far as the
# launch folder's `work/` reaches, walked by descriptor without following symlinks (task_folder).

TASK_FILES = (".command.sh", ".command.err", ".command.out", ".command.log", ".command.run", ".command.trace",
              ".exitcode")
FAILED_TASKS_SHOWN, ERR_TAIL_LINES, ERR_TAIL_BYTES = 5, 20, 4096
SPREADS = ("realtime", "peak_rss")  # the processes view's {min, median, max} columns (indexed: see MIGRATIONS)
# The report and timeline are Nextflow's self-contained pages: inline scripts and styles, data: images.
# Served from our origin, their scripts (and whatever a task name smuggled into them) could read what
# a page of ours keeps (a web UI's stored token) and call the API. `sandbox` gives them an opaque
# origin of their own, and default-src 'none' lets them load and send nothing.
REPORT_POLICY = ("sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; "
                 "style-src 'unsafe-inline'; img-src data:; font-src data:")
REPORT_HEADERS = {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": REPORT_POLICY}


def task_row(conn, run_id, task_id):
    row = conn.execute("SELECT * FROM tasks WHERE run_id = ? AND task_id = ?", (run_id, task_id)).fetchone()
    if row is None:
        raise ApiError(404, "task", "no task %d in this run (yet)" % task_id)
    return row


def workflow_run_task(req, id, run_id, task_id):
    """One task with every metric Nextflow reported for it."""
    with req.db() as conn:
        run_row(conn, id, run_id)
        return 200, {"task": task_json(task_row(conn, run_id, task_id))}


def workflow_run_processes(req, id, run_id):
    """One row per process, in the order Nextflow first reported it: its tasks by status (`submitted`
    counts them all), and the min, median and max `realtime` (ms) and `peak_rss` (bytes) of its tasks.
    A page at a time (`limit`, 1000 by default); `next_offset` is the `offset` of the next page, null
    after the last."""
    offset, limit = page_bounds(req)
    with req.db() as conn:
        run_row(conn, id, run_id)
        rows = conn.execute("SELECT * FROM processes WHERE run_id = ? ORDER BY rowid LIMIT ? OFFSET ?",
                            (run_id, limit + 1, offset)).fetchall()
        return 200, {"processes": [process_json(conn, row) for row in rows[:limit]],
                     "next_offset": offset + limit if len(rows) > limit else None}


def process_json(conn, row):
    process = {key: row[key] for key in ("process", "submitted", "running", "completed", "failed", "cached", "aborted")}
    for column, count in zip(SPREADS, (row["realtimes"], row["peak_rsses"])):
        process[column] = spread(conn, row["run_id"], row["process"], column, count)
    return process


def spread(conn, run_id, process, column, count):
    """{min, median, max} of the `count` values the process's tasks have in `column`, from its index:
    min and max at its two ends, the median `count / 2` steps in (SQLite's OFFSET walks the index:
    about 30 ns a step, 2 ms for a process of 100,000 tasks)."""
    if not count:
        return {"min": None, "median": None, "max": None}

    def values(order, limit, offset):
        query = ("SELECT {column} FROM tasks WHERE run_id = ? AND process = ? AND {column} IS NOT NULL "
                 "ORDER BY {column} {order} LIMIT ? OFFSET ?").format(column=column, order=order)
        return [row[0] for row in conn.execute(query, (run_id, process, limit, offset))]
    middle = values("ASC", 2 - count % 2, (count - 1) // 2)
    return {"min": values("ASC", 1, 0)[0], "median": sum(middle) / len(middle), "max": values("DESC", 1, 0)[0]}


def workflow_run_task_file(req, id, run_id, task_id, name):
    """One of Nextflow's files in the task's work folder (TASK_FILES), as text from `offset`, with
    `X-Next-Offset` and `X-Run-Status` as the run log has; the run's secret and the tokens masked.
    404, saying why, when the work folder is not inside the run's launch folder."""
    if name not in TASK_FILES:
        raise ApiError(404, "name", "only these task files are served: %s" % ", ".join(TASK_FILES))
    offset = req.query_int("offset", 0)
    with req.db() as conn:
        run = run_row(conn, id, run_id)
        task = task_row(conn, run_id, task_id)
    with task_folder(req.app, id, task["workdir"]) as folder:
        entry, size = open_task_file(folder, name)
    with entry:
        data = read_masked(entry.fd, size, offset, log_secrets(req.app, run), run["status"] in ACTIVE_RUN_STATES)
    return 200, Body.of({"Content-Type": "text/plain; charset=utf-8", "X-Next-Offset": str(offset + len(data)),
                         "X-Log-Size": str(size), "X-Run-Status": run["status"]}, data)


def task_folder(app, workflow_id, workdir):
    """The task's work folder as a Descriptor. It must name a folder below the workflow's launch
    folder's `work/`, and is opened from the data folder's `launch/` one name at a time without
    following symlinks: a forged `workdir` (/etc, another workflow's folder, a symlink out) is 404."""
    work = os.path.join(app.launch_dir(workflow_id), "work")
    if workdir is None:
        raise ApiError(404, "workdir", "Nextflow has not reported this task's work folder")
    rest = workdir[len(work) + 1:] if workdir.startswith(work + "/") else ""
    names = rest.split("/") if rest and not relative_path_problem(rest) else []
    if not names or any(name in ("", ".", "..") for name in names):
        raise ApiError(404, "workdir", "the task's work folder %s is not inside this run's launch folder %s, so "
                                       "its files are not served (was workDir set elsewhere?)" % (workdir, work))
    try:
        with Descriptor(os.open(os.path.dirname(app.launch_dir(workflow_id)), FOLDER_FLAGS)) as launch:
            return open_folder(launch, [str(workflow_id), "work"] + names, "workdir")
    except ApiError as e:
        raise ApiError(404, "workdir", "the task's work folder cannot be opened: %s" % e.errors["workdir"][0])
    except OSError as e:
        raise ApiError(404, "workdir", "the task's work folder cannot be opened: %s" % e.strerror)


def open_task_file(folder, name):
    """(Descriptor, size) of the regular file `name` in the folder descriptor `folder`; 404 otherwise."""
    try:
        entry, st = open_entry(folder, name, "name")
    except ApiError as e:
        raise ApiError(404, "name", "the task's %s is not served: %s" % (name, e.errors["name"][0]))
    except OSError as e:
        raise ApiError(404, "name", "the task's %s cannot be read: %s" % (name, e.strerror))
    if not stat.S_ISREG(st.st_mode):
        entry.close()
        raise ApiError(404, "name", "the task's %s is a folder" % name)
    return entry, st.st_size


def remember_failed_tasks(app, run):
    """Keep the run's first FAILED_TASKS_SHOWN failed tasks as its `failed_tasks`, each with the last
    lines of its .command.err read now: the run's JSON then answers what went wrong without reading a
    file, and still does once the work folder is cleaned up. Call it, outside a transaction, after a
    task is recorded as FAILED (the weblog does; so must a reconciliation from the trace file).
    `run` needs its id, workflow_id and secret."""
    shown = "SELECT task_id, name, process, exit, workdir, command_err FROM tasks " \
            "WHERE run_id = ? AND status = 'FAILED' ORDER BY task_id LIMIT ?"
    with app.db.connection() as conn:
        rows = conn.execute(shown, (run["id"], FAILED_TASKS_SHOWN)).fetchall()
    tails = [(command_err_tail(app, run, row["workdir"]), run["id"], row["task_id"])
             for row in rows if row["command_err"] is None]
    with app.db.write() as conn:
        conn.executemany("UPDATE tasks SET command_err = ? WHERE run_id = ? AND task_id = ? AND command_err IS NULL",
                         tails)
        failed = [{key: row[key] for key in ("task_id", "name", "process", "exit", "command_err")}
                  for row in conn.execute(shown, (run["id"], FAILED_TASKS_SHOWN))]
        conn.execute("UPDATE runs SET failed_tasks = ? WHERE id = ?", (json.dumps(failed), run["id"]))
    app.changes.notify(run["workflow_id"])


def remember_failed_tasks_left_out(app):
    """At start: remember_failed_tasks for runs with a failed task and no `failed_tasks`, which a
    server killed between the two leaves, as does one from before `failed_tasks` existed."""
    with app.db.connection() as conn:
        runs = conn.execute("SELECT id, workflow_id, secret FROM runs WHERE failed_tasks IS NULL AND failed > 0 AND "
                            "EXISTS (SELECT 1 FROM tasks WHERE run_id = runs.id AND status = 'FAILED')").fetchall()
    for run in runs:
        remember_failed_tasks(app, run)


def command_err_tail(app, run, workdir):
    """The last ERR_TAIL_LINES lines (at most ERR_TAIL_BYTES) of a task's .command.err, secrets masked;
    None when it cannot be read (see task_folder)."""
    try:
        with task_folder(app, run["workflow_id"], workdir) as folder:
            entry, size = open_task_file(folder, ".command.err")
    except ApiError:
        return None
    with entry:
        start = max(0, size - ERR_TAIL_BYTES)
        lines = read_masked(entry.fd, size, start, log_secrets(app, run), False).decode("utf-8", "replace").splitlines()
    if start and len(lines) > 1:
        lines = lines[1:]  # cut by the byte limit
    return "\n".join(lines[-ERR_TAIL_LINES:])


def workflow_run_report(req, id, run_id):
    """Nextflow's HTML execution report of the run (written when the run ends)."""
    return run_file(req, id, run_id, "report.html", REPORT_HEADERS)


def workflow_run_timeline(req, id, run_id):
    """Nextflow's HTML timeline of the run (written when the run ends)."""
    return run_file(req, id, run_id, "timeline.html", REPORT_HEADERS)


def workflow_run_trace(req, id, run_id):
    """Nextflow's trace file of the run: a header line, then one tab-separated line per task."""
    return run_file(req, id, run_id, "trace.txt", {"Content-Type": "text/plain; charset=utf-8"})


def run_file(req, workflow_id, run_id, name, headers):
    """A file Nextflow writes in the run folder, streamed with the run's secret and the tokens masked
    (the report shows nextflow's command line, weblog URL included). Opened without following a link
    or waiting for a FIFO's writer (see open_below); 404 until it exists."""
    with req.db() as conn:
        run = run_row(conn, workflow_id, run_id)
    try:
        entry = req.app.open_run_file(run_id, name)
    except FileNotFoundError:
        raise ApiError(404, "run", "this run has no %s (yet): Nextflow writes it into the run folder" % name)
    except OSError:
        raise ApiError(409, "run", "the run's %s is not a regular file (a link, a FIFO...), so it is not served" % name)
    st = os.fstat(entry.fd)
    if not stat.S_ISREG(st.st_mode):
        entry.close()
        raise ApiError(409, "run", "the run's %s is not a regular file, so it is not served" % name)
    secrets = log_secrets(req.app, run)

    def send(handler):
        with entry:
            send_masked(handler.wfile, entry.fd, st.st_size, secrets)
    return 200, Body(headers, st.st_size, send)


def send_masked(out, fd, size, secrets):
    """Write the first `size` bytes of the open file `fd` with `secrets` masked, a chunk at a time.
    A chunk's last bytes wait for the next one: they may be the start of a secret."""
    margin = max(len(secret) for secret in secrets) - 1
    held, offset = b"", 0
    while offset < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
        if not chunk:
            raise ConnectionAbortedError("the file shrank while it was being sent")
        offset += len(chunk)
        data = mask_secrets(held + chunk, secrets)
        cut = max(0, len(data) - margin) if offset < size else len(data)
        out.write(data[:cut])
        held = data[cut:]


# ==== Socket.IO (polling) ====
# nf-cloud's web UI follows its runs over Socket.IO 5 on Engine.IO 4 (the protocol documents are
# docs/engine.io-protocol/v4-current.md and docs/socket.io-protocol/v5-current.md in socket.io's
# repository). Only the HTTP long-polling transport is served and no upgrade is offered: a GET waits
# for the session's packets, a POST delivers the client's; packets are joined by the record
# separator. The UI joins the room `workflow<id>` and hears `new-progress` when the latest run's
# counters change and `finished-workflow` when it ends, as nf-cloud's own backend told it; both
# are worked out from the database when the workflow's notification (see Changes) wakes the GET.

ENGINEIO_SEPARATOR = "\x1e"
MAX_SOCKET_SESSIONS = 1000
MAX_SOCKET_PACKETS = 100  # waiting for a session's next GET; more end the session
MAX_SOCKET_ROOMS = 100
MAX_SOCKET_PAYLOAD = 64 * 1024  # a POST's body; announced as maxPayload
SOCKETIO_ROOM = re.compile(r"workflow([0-9]{1,18})\Z")
SOCKETIO_EVENT = re.compile(r"([0-9]{0,18})(\[.*)\Z", re.DOTALL)  # [ack id] then the JSON array
ENGINEIO_TEXT = {"Content-Type": "text/plain; charset=UTF-8"}
# engine.io's own server answers refused requests with 400 and one of these codes.
ENGINEIO_ERRORS = {0: "Transport unknown", 1: "Session ID unknown", 2: "Bad handshake method", 3: "Bad request",
                   5: "Unsupported protocol version"}


class EngineIOError(Exception):
    """A request refused the way Engine.IO clients know: 400 with `{"code", "message"}`."""

    def __init__(self, code, field, advice):
        super().__init__(advice)
        self.code, self.field = code, field

    def answer(self):
        return 400, {"code": self.code, "message": ENGINEIO_ERRORS[self.code], "errors": {self.field: [str(self)]}}


class SocketSession:
    """One Engine.IO session: the packets for its next GET and the rooms it follows."""

    def __init__(self, sid, now, generation, read_only):
        self.sid = sid
        self.read_only = read_only  # opened with the read-only token: see read_only_share
        self.key = ("socket.io", sid)  # its key in Changes: a POST wakes the waiting GET
        self.outbox = []  # encoded packets for the next GET
        self.rooms = {}  # workflow id -> the room state last told (see room_state)
        self.checked = generation  # the rooms' changes up to this generation are told
        self.connected = False  # to the main namespace "/"
        self.answered_at = now  # the handshake or the last pong
        self.pinged = False
        self.polling = False  # a GET is waiting
        self.farewell = None  # once closed: the packet that ends a waiting GET


class SocketIO:
    """The server's Engine.IO sessions.

    The heartbeat: pingInterval after the handshake or the last pong, the next GET gets a ping
    (`2`); a session whose client has not answered (`3`) pingTimeout later is closed, so a client
    that went away holds nothing for long.
    """

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()  # the sessions and everything in them
        self.sessions = {}
        self.read_only_sessions = 0
        self.ping_interval = app.config["ping_interval"]
        self.ping_timeout = self.ping_interval  # as long again to answer a ping as between pings

    def open(self, read_only):
        """A new session; its handshake is the `open` packet."""
        now = time.monotonic()
        with self.lock:
            for session in [s for s in self.sessions.values() if self.expired(s, now)]:
                self.close(session, "1")
            if len(self.sessions) >= MAX_SOCKET_SESSIONS or (
                    read_only and self.read_only_sessions >= read_only_share(MAX_SOCKET_SESSIONS)):
                raise ApiError(503, "sid", "too many Socket.IO sessions; try again later", {"Retry-After": "5"})
            session = SocketSession(secrets.token_urlsafe(15), now, self.app.changes.generation, read_only)
            self.sessions[session.sid] = session
            self.read_only_sessions += read_only
        return "0" + json.dumps({"sid": session.sid, "upgrades": [], "pingInterval": self.ping_interval * 1000,
                                 "pingTimeout": self.ping_timeout * 1000, "maxPayload": MAX_SOCKET_PAYLOAD})

    def expired(self, session, now):
        return now > session.answered_at + self.ping_interval + self.ping_timeout

    def find(self, sid):
        """The open session `sid` (the caller holds the lock)."""
        session = self.sessions.get(sid)
        if session is not None and self.expired(session, time.monotonic()):
            self.close(session, "1")
            session = None
        if session is None:
            raise EngineIOError(1, "sid", "no such Socket.IO session (it was closed or expired): open a new one")
        return session

    def close(self, session, farewell):
        """End a session (the caller holds the lock); a waiting GET answers `farewell`."""
        if session.farewell is not None:
            return
        session.farewell = farewell
        del self.sessions[session.sid]
        self.read_only_sessions -= session.read_only
        self.app.changes.notify(session.key)
        if not session.polling:
            self.app.changes.forget(session.key)

    def poll(self, sid):
        """The packets for one GET: at once when some are waiting, else once a room changes, a
        POST queues some, a ping is due or the session ends."""
        with self.lock:
            session = self.find(sid)
            if session.polling:
                # Two GETs at once would take packets out of order (the protocol forbids it).
                self.close(session, "1")
                raise EngineIOError(3, "sid", "a GET was already waiting for this session: the session is closed")
            session.polling = True
        try:
            return self.wait_for_packets(session)
        finally:
            with self.lock:
                session.polling = False
                if session.farewell is not None:
                    self.app.changes.forget(session.key)

    def wait_for_packets(self, session):
        while True:
            generation = self.app.changes.generation
            told = self.tell_rooms(session, generation)
            with self.lock:
                session.outbox += told
                now = time.monotonic()
                if session.farewell is None and self.expired(session, now):
                    self.close(session, "1")
                if session.farewell is not None:
                    return [session.farewell]
                ping_at = session.answered_at + self.ping_interval
                if not session.pinged and now >= ping_at:
                    session.outbox.append("2")
                    session.pinged = True
                if session.outbox:
                    packets, session.outbox = session.outbox, []
                    return packets
                wake_at = ping_at + self.ping_timeout if session.pinged else ping_at
                keys = [session.key] + list(session.rooms)
            self.app.changes.wait(keys, generation, wake_at - now)

    def tell_rooms(self, session, generation):
        """Event packets for the rooms that changed since the session last looked. The database is
        read outside the lock; `generation` was taken before it, so no change falls between."""
        with self.lock:
            changed = [w for w in session.rooms if self.app.changes.changed_since(w, session.checked)]
            session.checked = generation
        states = {workflow_id: room_state(self.app, workflow_id) for workflow_id in changed}
        packets = []
        with self.lock:
            for workflow_id, state in states.items():
                if workflow_id in session.rooms:
                    packets += [socketio_event(e) for e in room_events(session.rooms[workflow_id], state)]
                    session.rooms[workflow_id] = state
        return packets

    def receive(self, sid, body):
        """A POST's packets, in order. A packet that breaks the protocol closes the session."""
        with self.lock:
            session = self.find(sid)
            try:
                try:
                    payload = body.decode("utf-8")
                except UnicodeDecodeError:
                    raise EngineIOError(3, "body", "Engine.IO packets are UTF-8 text")
                for packet in payload.split(ENGINEIO_SEPARATOR):
                    if session.farewell is None:
                        self.receive_packet(session, packet)
                if len(session.outbox) > MAX_SOCKET_PACKETS:
                    raise EngineIOError(3, "body", "over %d packets wait for this session's GET" % MAX_SOCKET_PACKETS)
            except EngineIOError:
                self.close(session, "1")
                raise
            if session.farewell is None:
                # The waiting GET takes the new packets, and waits on the rooms as they are now.
                self.app.changes.notify(session.key)

    def receive_packet(self, session, packet):
        kind, data = packet[:1], packet[1:]
        if kind == "3":  # pong
            session.answered_at, session.pinged = time.monotonic(), False
        elif kind == "4":  # message: a Socket.IO packet
            self.receive_socketio(session, data)
        elif kind == "1":  # close
            self.close(session, "6")
        elif kind != "6":  # noop
            raise EngineIOError(3, "body", "not an Engine.IO packet this server takes (no upgrades, no binary): %r"
                                % packet[:40])

    def receive_socketio(self, session, packet):
        kind, data = packet[:1], packet[1:]
        namespace = "/"
        if data.startswith("/"):
            namespace, _, data = data.partition(",")
        if kind == "0" and namespace == "/":  # CONNECT
            session.connected = True
            session.outbox.append("40" + json.dumps({"sid": secrets.token_urlsafe(15)}))
        elif kind == "0":
            session.outbox.append("44%s,%s" % (namespace, json.dumps({"message": "Invalid namespace"})))
        elif kind == "1":  # DISCONNECT
            if namespace == "/":
                session.connected = False
                session.rooms.clear()
        elif kind == "2" and namespace == "/" and session.connected:  # EVENT
            self.receive_event(session, data)
        elif kind != "3":  # an ACK is not expected (we ask for none), and it is harmless
            raise EngineIOError(3, "body", "a Socket.IO packet that is not CONNECT, DISCONNECT or EVENT "
                                           "after CONNECT: %r" % packet[:40])

    def receive_event(self, session, data):
        """`join` and `leave` a room `workflow<id>`; other events are ignored, as a server without a
        handler for them would. An ack id is answered with an empty ACK."""
        event = SOCKETIO_EVENT.match(data)
        try:
            args = JSON_DECODER.decode(event.group(2)) if event else None
        except ValueError:
            args = None
        if not isinstance(args, list) or not args or not isinstance(args[0], str):
            raise EngineIOError(3, "body", "an EVENT needs a JSON array that starts with the event's name")
        room = args[1].get("room") if len(args) > 1 and isinstance(args[1], dict) else None
        match = SOCKETIO_ROOM.match(room) if isinstance(room, str) else None
        workflow_id = int(match.group(1)) if match else None
        if args[0] == "join" and match and workflow_id not in session.rooms:
            if len(session.rooms) >= MAX_SOCKET_ROOMS:
                raise EngineIOError(3, "body", "a session follows at most %d rooms" % MAX_SOCKET_ROOMS)
            session.rooms[workflow_id] = room_state(self.app, workflow_id)
        elif args[0] == "leave":
            session.rooms.pop(workflow_id, None)
        if event.group(1):
            session.outbox.append("43%s[]" % event.group(1))


def room_state(app, workflow_id):
    """What a room is told about: its latest run's (id, status, submitted, completed)."""
    with app.db.connection() as conn:
        row = conn.execute("SELECT id, status, submitted, completed FROM runs WHERE workflow_id = ? "
                           "ORDER BY id DESC LIMIT 1", (workflow_id,)).fetchone()
    return tuple(row) if row else (None, None, 0, 0)


def room_events(told, now):
    """The events for a room whose state went from `told` to `now`: `new-progress` when the run or
    its counters changed (a new run starts at 0 of 0), `finished-workflow` when a run ended."""
    events = []
    if now[0] != told[0] or now[2:] != told[2:]:
        events.append(["new-progress", {"submitted_processes": now[2], "completed_processes": now[3]}])
    if now[1] in FINAL_RUN_STATES and (now[0] != told[0] or told[1] not in FINAL_RUN_STATES):
        events.append(["finished-workflow", {}])
    return events


def socketio_event(args):
    return "42" + json.dumps(args, separators=(",", ":"))


def engineio_session(req):
    """The `sid` of an Engine.IO request, None for a handshake; the protocol and transport are checked."""
    query = req.query()
    if query.get("EIO") != "4":
        raise EngineIOError(5, "EIO", "this server speaks Engine.IO 4 (Socket.IO 3 and later): EIO=4")
    if query.get("transport") != "polling":
        raise EngineIOError(0, "transport", "only transport=polling is served (no WebSocket)")
    return query.get("sid")


def engineio_answers(handler):
    """Turn EngineIOError into its answer."""
    @functools.wraps(handler)
    def answer(req):
        try:
            return handler(req)
        except EngineIOError as e:
            return e.answer()
    return answer


@engineio_answers
def socketio_poll(req):
    """Engine.IO long-polling GET: without `sid` the handshake, else the session's next packets."""
    sid = engineio_session(req)
    packets = [req.app.sockets.open(req.read_only)] if sid is None else req.app.sockets.poll(sid)
    return 200, Body.of(ENGINEIO_TEXT, ENGINEIO_SEPARATOR.join(packets).encode())


@engineio_answers
def socketio_send(req):
    """Engine.IO long-polling POST: the client's packets, joined by the record separator."""
    sid = engineio_session(req)
    if sid is None:
        raise EngineIOError(2, "sid", "a session starts with a GET (the handshake)")
    if req.body_left > MAX_SOCKET_PAYLOAD:
        raise ApiError(413, "body", "Engine.IO payloads are limited to %d bytes" % MAX_SOCKET_PAYLOAD)
    req.app.sockets.receive(sid, b"".join(req.body_chunks()))
    return 200, Body.of(ENGINEIO_TEXT, b"ok")


# ==== Web page and download links ====
# The page is one static file beside this one. It holds no data, so it is served without a token;
# everything it shows comes from the API with the token the person typed or followed a link with.
# A link cannot carry a header, so downloads go through short-lived tickets: a random name bound to
# one workflow, path and format, which the browser follows straight to disk (no result in memory).

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nfapi_ui.html")
DOWNLOAD_LINK_SECONDS = 300
MAX_DOWNLOAD_LINKS = 10000  # live at once: a token holder looping on download-link cannot fill memory


def public(handler):
    """Mark a route that needs no token: the page itself, and a download link (its ticket is the key)."""
    handler.public = True
    return handler


def ticket_auth(handler):
    """Mark a route whose key is a download link's ticket: the link is found before the request takes
    its slot, so one asked for with the read-only token counts in that token's share (slot_share)."""
    handler.ticket_auth = handler.public = True
    return handler


def reads_only(handler):
    """Mark a POST that changes nothing, so that the read-only token may call it as it may GET."""
    handler.reads_only = True
    return handler


@public
def web_page(req):
    """The web page: nfapi_ui.html from beside the server, with a Content-Security-Policy that lets
    only its own inline script and style run and lets it talk only to this server."""
    try:
        st = os.stat(WEB_PAGE)
    except FileNotFoundError:
        raise ApiError(404, "page", "the web page is not installed (put nfapi_ui.html beside nfapi.py); "
                                    "the API works without it")
    page, policy = web_page_and_policy(st.st_mtime_ns, st.st_size)
    return 200, Body.of({"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": policy,
                         "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}, page)


@functools.lru_cache(maxsize=1)
def web_page_and_policy(mtime_ns, size):
    """Read once per version of the file (the arguments are its identity), so an edit shows on reload."""
    with open(WEB_PAGE, "rb") as f:
        page = f.read()
    return page, content_security_policy(page)


def content_security_policy(page):
    """CSP 3: inline <script> and <style> blocks run only when their exact text hashes to a listed value."""
    def hashes(tag):
        blocks = re.findall(b"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(b).digest()).decode() for b in blocks)
    return ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
            % (hashes(b"script") or "'none'", hashes(b"style") or "'none'"))


def web_page_line(host, port, app):
    """Where the page is, for the start-up output. The sign-in link carries the token in its fragment
    (which a browser never sends or logs), but only to a person at a terminal: output that goes to a
    file is a log, and no log holds the token."""
    url = "http://%s:%d/" % (host, port)
    if sys.stdout.isatty():
        return "web page: %s#token=%s" % (url, app.token)
    return "web page: %s (sign in with the API token from %s)" % (url, app.token_source)


def whoami(req):
    """Whether the caller holds the read-only token (the web page then leaves out what it cannot do)."""
    return 200, {"read_only": req.read_only}


DownloadLink = collections.namedtuple("DownloadLink", "workflow_id path fmt read_only")  # read_only: who asked


class DownloadLinks:
    """Live tickets in memory, oldest first: every ticket lives as long, so the expired ones are at
    the front. A restart forgets them (the page asks for a new link)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tickets = collections.OrderedDict()  # ticket -> (expiry, DownloadLink)
        self.read_only_tickets = 0  # asked for with the read-only token: see read_only_share

    def create(self, workflow_id, path, fmt, read_only):
        ticket = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self.lock:
            while self.tickets and next(iter(self.tickets.values()))[0] <= now:
                self.read_only_tickets -= self.tickets.popitem(last=False)[1][1].read_only
            if len(self.tickets) >= MAX_DOWNLOAD_LINKS or (
                    read_only and self.read_only_tickets >= read_only_share(MAX_DOWNLOAD_LINKS)):
                raise ApiError(429, "path", "too many download links at once; use the ones you have or wait "
                                            "%d minutes" % (DOWNLOAD_LINK_SECONDS // 60), {"Retry-After": "60"})
            self.tickets[ticket] = (now + DOWNLOAD_LINK_SECONDS, DownloadLink(workflow_id, path, fmt, read_only))
            self.read_only_tickets += read_only
        return ticket

    def find(self, ticket):
        """The DownloadLink of a live ticket."""
        with self.lock:
            found = self.tickets.get(ticket)
        if found is None or found[0] <= time.monotonic():
            raise ApiError(404, "ticket", "no such download link, or it has expired; ask for a new one")
        return found[1]


@reads_only
def workflow_download_link(req, id):
    """A link that downloads `path` (a file, or a folder as `format`) without a token, for a few minutes."""
    body = req.json()
    path, fmt = body.get("path", ""), body.get("format", "zip")
    names = path_names(path, "path")
    if fmt not in ARCHIVE_FORMATS:
        raise ApiError(422, "format", "must be zip or tar.gz")
    with req.app.open_workflow_folder(id) as root:
        if path_lstat(root, names, "path") is None:
            raise ApiError(404, "path", "no such file or folder")
    ticket = req.app.download_links.create(id, path, fmt, req.read_only)
    return 200, {"url": "/api/download/" + ticket, "expires_in": DOWNLOAD_LINK_SECONDS}


@ticket_auth
def download(req, ticket):
    """Follow a download link: exactly what GET /api/workflows/<id>/download serves for its path and format."""
    # The bound values stand in for the query string; Range and If-None-Match apply as usual.
    req.query_params = {"path": req.link.path, "format": req.link.fmt}
    return workflow_download(req, req.link.workflow_id)


# ==== Routes ====
# <int:id> matches ASCII digits only (int() would accept '١٢'); <name> is one percent-decoded segment.

ROUTES = [
    ("GET", "/api/workflows", workflows_list),
    ("GET", "/api/workflows/count", workflows_count),
    ("POST", "/api/workflows/create", workflow_create),
    ("GET", "/api/workflows/<int:id>", workflow_get),
    ("POST", "/api/workflows/<int:id>/update", workflow_update),
    ("POST", "/api/workflows/<int:id>/delete", workflow_delete),
    ("GET", "/api/workflows/<int:id>/files", workflow_files),
    ("POST", "/api/workflows/<int:id>/upload-file", workflow_upload_file),
    ("POST", "/api/workflows/<int:id>/delete-path", workflow_delete_path),
    ("POST", "/api/workflows/<int:id>/create-folder", workflow_create_folder),
    ("POST", "/api/workflows/<int:id>/schedule", workflow_schedule),
    ("POST", "/api/workflows/<int:id>/cancel", workflow_cancel),
    ("GET", "/api/workflows/<int:id>/command", workflow_command),
    ("POST", "/api/workflows/<int:id>/finished", workflow_finished),
    ("POST", "/api/workflows/<int:id>/nextflow-log", workflow_nextflow_log),
    ("GET", "/api/workflows/<int:id>/runs", workflow_runs),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>", workflow_run),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/tasks", workflow_run_tasks),
    ("POST", "/api/workflows/<int:id>/runs/<int:run_id>/relaunch", workflow_run_relaunch),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/notifications", workflow_run_notifications),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/tasks/<int:task_id>", workflow_run_task),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/tasks/<int:task_id>/files/<name>", workflow_run_task_file),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/processes", workflow_run_processes),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/report", workflow_run_report),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/timeline", workflow_run_timeline),
    ("GET", "/api/workflows/<int:id>/runs/<int:run_id>/trace", workflow_run_trace),
    ("GET", "/api/workflows/<int:id>/log", workflow_log),
    ("GET", "/api/workflows/<int:id>/download", workflow_download),
    ("GET", "/api/nextflow-workflows", pipelines_list),
    ("GET", "/api/nextflow-workflows/<name>/arguments", pipeline_arguments),
    ("POST", "/api/worker/claim", worker_claim),
    ("POST", "/api/worker/heartbeat", worker_heartbeat),
    ("POST", "/api/worker/release", worker_release),
    ("GET", "/api/worker/check", worker_check),
    ("GET", "/api/workers", workers_list),
    ("GET", "/api/openapi.json", openapi_json),
    ("GET", "/socket.io/", socketio_poll),
    ("POST", "/socket.io/", socketio_send),
    ("GET", "/", web_page),
    ("GET", "/api/whoami", whoami),
    ("POST", "/api/workflows/<int:id>/download-link", workflow_download_link),
    ("GET", "/api/download/<ticket>", download),
]


def compile_route(pattern):
    def group(m):
        return "(?P<%s>%s)" % (m.group(2), "[0-9]{1,18}" if m.group(1) else "[^/]+")
    return re.compile(re.sub(r"<(int:)?(\w+)>", group, re.escape(pattern)) + r"\Z")


COMPILED_ROUTES = [(method, compile_route(pattern), handler) for method, pattern, handler in ROUTES]
INT_PARAMS = {name for _, pattern, _ in ROUTES for name in re.findall(r"<int:(\w+)>", pattern)}


def match_route(method, path):
    """Return (handler, params); raise 404, or 405 with Allow when only the method is wrong."""
    allowed = []
    for route_method, regex, handler in COMPILED_ROUTES:
        m = regex.match(path)
        if not m:
            continue
        if route_method != method:
            allowed.append(route_method)
            continue
        return handler, {key: convert_param(key, value) for key, value in m.groupdict().items()}
    if allowed:
        raise ApiError(405, "method", "use %s" % " or ".join(allowed), {"Allow": ", ".join(allowed)})
    raise ApiError(404, "path", "no such endpoint")


def convert_param(key, value):
    if key in INT_PARAMS:
        return int(value)
    try:
        return urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, key, "bad percent-encoding")


# ==== OpenAPI ====
# One entry per handler: (query parameters, request body, success answer). The document is built
# from ROUTES and this table; a test checks that both list the same routes and that every answer
# the test suite sees validates against it.

def ref(name):
    return {"$ref": "#/components/schemas/" + name}


def obj(required_keys=(), **properties):
    return {"type": "object", "required": list(required_keys), "properties": properties}


def nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


def array(items):
    return {"type": "array", "items": items}


STR, NUM, BOOL = {"type": "string"}, {"type": "number"}, {"type": "boolean"}
INT = {"type": "integer", "minimum": -2 ** 63, "maximum": 2 ** 63 - 1}
ID = {"type": "integer", "minimum": 0, "maximum": 10 ** 18 - 1}
EMPTY_OBJECT = {"type": "object", "maxProperties": 0}
# What each rule of TASK_FIELDS keeps.
KEPT_AS = {text_or_none: STR, job_id: STR, percent: dict(NUM, minimum=0), epoch_ms: dict(INT, minimum=1),
           exit_status: INT, amount: dict(INT, minimum=0)}
RUN_STATES = list(ACTIVE_RUN_STATES + FINAL_RUN_STATES)

SCHEMAS = {
    "Errors": obj(["errors"], errors={"type": "object", "additionalProperties": array(STR)}),
    "Argument": obj(["type", "desc", "value"], type={"enum": list(ARG_TYPES)}, desc=STR, value={}, required=BOOL,
                    help_text=STR, group=STR, hidden=BOOL, selectable_files=BOOL, selectable_folders=BOOL,
                    exists=BOOL, pattern=STR, integer=BOOL, minimum=NUM, maximum=NUM, is_multiline=BOOL,
                    min_length=INT, max_length=INT, options=array({})),
    "Run": obj(RUN_COLUMNS + ("id", "waiting_for"), id=INT, status={"enum": RUN_STATES}, pipeline=STR, created_at=NUM,
               started_at=nullable(NUM), finished_at=nullable(NUM), exit_code=nullable(INT),
               error_message=nullable(STR), submitted=INT, completed=INT, failed=INT, cached=nullable(INT),
               resume=BOOL, nextflow_run_name=nullable(STR), session_id=nullable(STR), worker=nullable(STR),
               command=array(STR), console_tail=nullable(STR), tasks_truncated=BOOL,
               late_report=nullable(obj(["reported_at", "exit_code", "cancelled", "console_tail"], reported_at=NUM,
                                        exit_code=nullable(INT), cancelled=BOOL, console_tail=nullable(STR))),
               revision=nullable(STR), pinned_nextflow_version=nullable(STR), nextflow_version=nullable(STR),
               commit_id=nullable(STR),
               # The first FAILED_TASKS_SHOWN failed tasks; command_err: the last lines of their .command.err
               # (null when it could not be read: a work folder outside the launch folder, or gone).
               failed_tasks=dict(array(obj(["task_id", "name", "process", "exit", "command_err"], task_id=INT,
                                           name=nullable(STR), process=nullable(STR), exit=nullable(INT),
                                           command_err=nullable(STR))), maxItems=FAILED_TASKS_SHOWN),
               # Set on a queued run older than `worker_absent_seconds` while no worker is seen.
               waiting_for=nullable({"enum": [NO_WORKER]})),
    "Workflow": obj(["id", "name", "nextflow_arguments", "nextflow_workflow", "submitted_processes",
                     "completed_processes", "is_scheduled", "status", "run", "notify_email"],
                    id=INT, name=STR, nextflow_arguments={"type": "object", "additionalProperties": ref("Argument")},
                    nextflow_workflow=STR, submitted_processes=INT, completed_processes=INT, is_scheduled=BOOL,
                    status=nullable({"enum": RUN_STATES}), run=nullable(ref("Run")), notify_email=array(STR)),
    # Nextflow's trace fields and units (TASK_FIELDS): epoch ms (submit, start, complete), ms (duration,
    # realtime, time), bytes (peak_rss, peak_vmem, rchar, wchar, read_bytes, write_bytes, memory, disk),
    # percent (%cpu, %mem); native_id is the executor's job id (the PID for the local executor).
    "Task": obj(("task_id", "status") + tuple(name for name, _, _ in TASK_FIELDS), task_id=INT,
                status={"enum": list(TASK_STATUS_RANK)},
                **{name: nullable(KEPT_AS[keep]) for name, _, keep in TASK_FIELDS}),
    "Process": obj(["process", "submitted", "running", "completed", "failed", "cached", "aborted", "realtime",
                    "peak_rss"], process=STR, submitted=INT, running=INT, completed=INT, failed=INT, cached=INT,
                   aborted=INT, realtime=ref("Spread"), peak_rss=ref("Spread")),
    "Spread": obj(["min", "median", "max"], min=nullable(NUM), median=nullable(NUM), max=nullable(NUM)),
    "Worker": obj(["name", "host", "pid", "slots", "nextflow_version", "runs", "last_seen", "connected"], name=STR,
                  host=nullable(STR), pid=nullable(INT), slots=nullable(INT), nextflow_version=nullable(STR),
                  runs=array(INT), last_seen=NUM, connected=BOOL),
    "Launch": obj(["run_id", "workflow_id", "argv", "cwd", "params", "params_file", "run_dir", "config_file",
                   "config", "config_url_token", "console_log", "lease_seconds", "claim_secret",
                   "claim_confirm_seconds"], run_id=INT, workflow_id=INT, argv=array(STR), cwd=STR,
                  params={"type": "object"}, params_file=STR, run_dir=STR, config_file=STR, config=STR,
                  config_url_token=STR, console_log=STR, lease_seconds=NUM, claim_secret=STR,
                  claim_confirm_seconds=NUM, nextflow_version=nullable(STR)),
    "Notification": obj(["id", "channel", "target", "status", "attempts", "next_at", "last_error", "sent_at"],
                        id=INT, channel={"enum": ["webhook", "email"]}, target=STR,
                        status={"enum": ["pending", "sent", "failed"]}, attempts=INT, next_at=nullable(NUM),
                        last_error=nullable(STR), sent_at=nullable(NUM)),
}

QUERY = {
    "offset": ID, "limit": ID, "dir": STR, "path": STR, "run": ID,
    "token": STR, "status": {"enum": list(TASK_STATUS_RANK) + [s.lower() for s in TASK_STATUS_RANK]}, "file": {"enum": ["console", "nextflow"]},
    "format": {"enum": list(ARCHIVE_FORMATS)}, "resume": {"enum": ["true", "false"]},
    "wait": {"type": "integer", "minimum": 0, "maximum": MAX_ANSWER_WAIT},
    "EIO": {"enum": ["4"]}, "transport": {"enum": ["polling"]}, "sid": STR, "t": STR,
}
PATH_ARGS = {"id": ID, "run_id": ID, "task_id": ID, "name": STR, "ticket": STR}
WORKER = dict(STR, minLength=1, maxLength=200)
CLAIM = obj(["run_id", "claim_secret"], run_id=INT, claim_secret=STR)
TEXT, BINARY, NO_CONTENT, PACKETS, HTML = "text", "binary", "empty", "engine.io packets", "html"
ENGINEIO_QUERY = ["EIO", "transport", "sid", "t"]

DOCS = {
    workflows_list: (["offset", "limit"], None, obj(["workflows"], workflows=array(ref("Workflow")))),
    workflows_count: ([], None, obj(["count"], count=INT)),
    workflow_create: ([], obj(["name"], name=dict(STR, minLength=1, maxLength=MAX_NAME_LENGTH)),
                      {"allOf": [obj(["workflow"], workflow=ref("Workflow")), ref("Workflow")]}),
    workflow_get: (["wait"], None, obj(["workflow"], workflow=ref("Workflow"))),
    workflow_update: ([], obj(nextflow_workflow=STR, nextflow_arguments={"type": "object"},
                              notify_email=dict(array(STR), maxItems=MAX_NOTIFY_EMAILS)), EMPTY_OBJECT),
    workflow_delete: ([], None, EMPTY_OBJECT),
    workflow_files: (["dir"], None, obj(["folders", "files"], folders=array(STR), files=array(STR))),
    workflow_upload_file: ([], "multipart", obj(["directory", "file"], directory=STR, file=STR)),
    workflow_delete_path: ([], obj(["path"], path=STR), NO_CONTENT),
    # `path`, or nf-cloud's `new_path` (inside `target_path`, default "").
    workflow_create_folder: ([], dict(obj(path=STR, new_path=STR, target_path=STR),
                                      anyOf=[{"required": ["path"]}, {"required": ["new_path"]}]), NO_CONTENT),
    workflow_schedule: ([], obj(resume=BOOL), obj(["is_scheduled", "run"], is_scheduled=BOOL, run=ref("Run"))),
    workflow_cancel: ([], None, obj(["workflow"], workflow=ref("Workflow"))),
    workflow_command: (["resume"], None, obj(["argv", "cwd", "params", "params_file", "config"], argv=array(STR),
                                              cwd=STR, params={"type": "object"}, params_file=STR, config=STR)),
    workflow_finished: ([], obj(["run_id", "claim_secret"], run_id=INT, claim_secret=STR, exit_code=nullable(INT),
                                error=nullable(STR), cancelled=BOOL, worker=STR), NO_CONTENT),
    workflow_nextflow_log: (["run", "token"], {"type": "object"}, NO_CONTENT),
    workflow_runs: (["offset", "limit"], None, obj(["runs"], runs=array(ref("Run")))),
    workflow_run: (["wait"], None, obj(["run"], run=ref("Run"))),
    workflow_run_tasks: (["status", "offset", "limit"], None, obj(["tasks", "next_offset"], tasks=array(ref("Task")),
                                                                   next_offset=nullable(INT))),
    workflow_run_relaunch: ([], obj(resume=BOOL), obj(["run"], run=ref("Run"))),
    workflow_run_notifications: ([], None, obj(["notifications"], notifications=array(ref("Notification")))),
    workflow_log: (["run", "offset", "file"], None, TEXT),
    workflow_download: (["path", "format"], None, BINARY),
    pipelines_list: ([], None, obj(["nextflow_workflows"], nextflow_workflows=array(STR))),
    pipeline_arguments: ([], None, obj(["arguments"], arguments={"type": "object", "additionalProperties": ref("Argument")})),
    workflow_run_task: ([], None, obj(["task"], task=ref("Task"))),
    workflow_run_task_file: (["offset"], None, TEXT),
    workflow_run_processes: (["offset", "limit"], None, obj(["processes", "next_offset"], processes=array(ref("Process")),
                                                             next_offset=nullable(INT))),
    workflow_run_report: ([], None, HTML),
    workflow_run_timeline: ([], None, HTML),
    workflow_run_trace: ([], None, TEXT),
    worker_claim: ([], obj(["worker"], worker=WORKER, wait=dict(NUM, minimum=0, maximum=MAX_CLAIM_WAIT),
                           host=nullable(dict(STR, minLength=1, maxLength=255)),
                           pid=nullable(dict(INT, minimum=1, maximum=2 ** 31 - 1)),
                           slots=nullable(dict(INT, minimum=1, maximum=10 ** 6)),
                           nextflow_version=nullable(dict(STR, minLength=1, maxLength=100))),
                   obj(["run"], run=nullable(ref("Launch")))),
    workers_list: ([], None, obj(["workers"], workers=array(ref("Worker")))),
    worker_heartbeat: ([], obj(["runs"], worker=WORKER, runs=dict(array(CLAIM), maxItems=1000)),
                       obj(["cancel", "gone"], cancel=array(INT), gone=array(INT))),
    worker_release: ([], CLAIM, EMPTY_OBJECT),
    worker_check: ([], None, obj(["data_dir", "data_dir_inode", "workflows_dir", "launch_dir", "runs_dir", "pipelines"],
                                 data_dir=STR, data_dir_inode=INT, workflows_dir=STR, launch_dir=STR, runs_dir=STR, pipelines={
                                     "type": "object", "additionalProperties": obj(
                                         script=STR, pipeline=STR, revision=STR, nextflow_version=STR)})),
    openapi_json: ([], None, {"type": "object"}),
    socketio_poll: (ENGINEIO_QUERY, None, PACKETS),
    socketio_send: (ENGINEIO_QUERY, TEXT, PACKETS),
    web_page: ([], None, HTML),
    whoami: ([], None, obj(["read_only"], read_only=BOOL)),
    workflow_download_link: ([], obj(path=STR, format={"enum": list(ARCHIVE_FORMATS)}),
                             obj(["url", "expires_in"], url=STR, expires_in=INT)),
    download: ([], None, BINARY),
}


def openapi_document():
    paths = {}
    for method, pattern, handler in ROUTES:
        path = re.sub(r"<(?:int:)?(\w+)>", r"{\1}", pattern)
        paths.setdefault(path, {})[method.lower()] = openapi_operation(handler, re.findall(r"<(?:int:)?(\w+)>", pattern))
    return {
        "openapi": "3.1.0",
        "info": {"title": "nfapi", "version": "1", "description": "Run Nextflow pipelines over HTTP."},
        "security": [{"apiToken": []}],
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "apiToken": {"type": "http", "scheme": "bearer",
                         "description": "Not needed by the server's owner on its Unix socket (--unix-socket), "
                                        "with Host: localhost and no foreign Origin"},
            "runSecret": {"type": "apiKey", "in": "query", "name": "token"},
            "runBasic": {"type": "http", "scheme": "basic"}}},
    }


def openapi_operation(handler, path_args):
    query, request, answer = DOCS[handler]
    operation = {"operationId": handler.__name__, "summary": (handler.__doc__ or handler.__name__).split("\n")[0],
                 "parameters": [{"name": n, "in": "path", "required": True, "schema": PATH_ARGS[n]} for n in path_args]
                 + [{"name": n, "in": "query", "schema": QUERY[n]} for n in query],
                 "responses": {"default": {"description": "an error", "content": {
                     "application/json": {"schema": ref("Errors")}}}}}
    if request == "multipart":
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": obj(
            ["file"], file={"type": "string", "contentMediaType": "application/octet-stream"}, directory=STR)}}}
    elif request == TEXT:
        operation["requestBody"] = {"required": True, "content": {"text/plain": {"schema": STR}}}
    elif request is not None:
        if known_request_keys(handler) is not None:
            request = dict(request, additionalProperties=False)  # check_known_keys refuses the others
        operation["requestBody"] = {"required": bool(request.get("required")),
                                    "content": {"application/json": {"schema": request}}}
    if answer == NO_CONTENT:
        operation["responses"]["200"] = {"description": "done (empty body)"}
    elif answer == TEXT:
        operation["responses"]["200"] = {"description": "text from `offset`", "content": {"text/plain": {"schema": STR}}}
    elif answer == HTML:
        operation["responses"]["200"] = {"description": "Nextflow's self-contained page, sandboxed by its "
                                                        "Content-Security-Policy", "content": {"text/html": {"schema": STR}}}
    elif answer == PACKETS:
        operation["responses"]["200"] = {"description": "Engine.IO packets joined by the record separator (\\x1e), "
                                                        "or `ok` for a POST", "content": {"text/plain": {"schema": STR}}}
    elif answer == HTML:
        operation["responses"]["200"] = {"description": "the page", "content": {"text/html": {"schema": STR}}}
    elif answer == BINARY:
        binary = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
        operation["responses"].update({"200": {"description": "the file, or the folder as an archive", "content": {
            "application/octet-stream": binary, "application/zip": binary, "application/gzip": binary}},
            "206": {"description": "the requested range", "content": {"application/octet-stream": binary}},
            "304": {"description": "not modified (If-None-Match)"}})
    else:
        operation["responses"]["200"] = {"description": "success", "content": {"application/json": {"schema": answer}}}
    if getattr(handler, "run_secret_auth", False):
        operation["security"] = [{"runSecret": []}, {"runBasic": []}]
    if getattr(handler, "public", False):
        operation["security"] = []
    return operation


def known_request_keys(handler):
    """The top-level keys a JSON route's body may have, from its DOCS schema; None when the schema
    names none and so takes any (the weblog's), () when the route documents no body."""
    request = DOCS[handler][1]
    if request is None:
        return ()
    return request.get("properties")


def check_known_keys(handler, body):
    """422 for each top-level key the route does not know: a typo (`nextflow_workflw`) must not be
    ignored with 200. Every JSON body passes here (Handler.json), so no route can forget it."""
    known = known_request_keys(handler)
    if known is None:
        return
    unknown = [key for key in body if key not in known]
    if unknown:
        takes = "this request takes %s" % ", ".join(known) if known else "this request takes no fields"
        raise ApiError.of(422, {key: ["unknown field; %s" % takes] for key in unknown})


OPENAPI = openapi_document()


# ==== HTTP plumbing ====
# What the waiting room and the handler threads share.

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
# A body must arrive at this average rate, after an allowance of client_timeout seconds: a client
# sending a byte every few seconds cannot hold a thread for long. A timeout per receive alone let
# one byte every 20 s hold a thread for ever.
MIN_BODY_RATE = 16 * 1024
# After an answer on a keep-alive connection, its thread waits this long for the next request
# before the connection goes back to the waiting room: a client posting back to back (Nextflow's
# weblog) keeps its thread and pays nothing for the hand-over.
KEEP_ALIVE_WAIT = 0.05
SHUTDOWN_GRACE = 5.0  # seconds that requests in progress get to finish when the server stops
THREAD_IDLE_SECONDS = 2.0  # a handler thread with no connection for this long ends
HEAD_END = re.compile(rb"\n\r?\n")
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE = re.compile(r"(%s) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])" % TOKEN)
# RFC 9112 5: no space before the colon, no line folding; CR, LF and NUL are never part of a value.
HEADER_LINE = re.compile(r"(%s):[ \t]*([^\x00\r\n]*?)[ \t]*\r?" % TOKEN)
# How a client that vanished or stalled shows up (BlockingIOError: a receive or send past
# SO_RCVTIMEO or SO_SNDTIMEO).
CLIENT_GONE = (ConnectionError, socket.timeout, BlockingIOError)
BUSY_BODY = json.dumps({"errors": {"general": ["too many requests in progress; try again"]}}).encode()
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))


@functools.lru_cache(maxsize=2)
def http_date(second):
    return email.utils.formatdate(second, usegmt=True)


def timeval(seconds):
    seconds = max(seconds, 0.001)  # a zero timeval means "wait forever"
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def redact(text):
    """A request line or path with its weblog secret or download ticket cut out, for logs."""
    return re.sub(r"([?&]token=|/api/download/)[^&?\s]*", r"\1...", text)


# ==== Request heads ====
# Parsed here rather than by http.server, whose email-package header parser cost more than all the
# rest of a weblog post.

def find_head(data, searched=0):
    """The blank line that ends the request head in `data` (a match), or None while more may come;
    414 or 431 once the head cannot fit in MAX_HEAD_BYTES. `searched`: how much of `data` was
    searched before, as heads arrive in pieces."""
    end = HEAD_END.search(data, max(0, searched - 2))
    if (end.start() if end else len(data)) > MAX_HEAD_BYTES:
        if b"\n" not in data[:MAX_HEAD_BYTES]:
            raise ApiError(414, "request", "the request line is over %d bytes" % MAX_HEAD_BYTES)
        raise ApiError(431, "request", "the request head is over %d bytes" % MAX_HEAD_BYTES)
    return end


def skip_blank_lines(data):
    """Empty lines before a request line are ignored (RFC 9112 2.2)."""
    return data.lstrip(b"\r\n") if data[:1] in (b"\r", b"\n") else data


# ==== Unix socket ====
# The owner's own door (--unix-socket): a socket, mode 0600, in a folder only its owner can enter, that
# also tells who connected (SO_PEERCRED). Connections from any other uid are closed at once; requests
# from the owner need no token, unless a web page may have sent them. A socket forwarded to a port
# (ssh -L) is reachable from every page in that laptop's browser: a cross-site post carries the page's
# Origin, and a DNS-rebinding page the attacker's name as Host. Those requests need the token as usual.

UNIX_PEER = ("unix-socket", 0)  # the client address of a connection over the Unix socket
LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.I)


class UnixListener:
    """The listening Unix socket at `path`; close() removes it, unless another server replaced it."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        check_socket_folder(os.path.dirname(self.path))
        remove_stale_socket(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self.inode = os.stat(self.path).st_ino
            self.sock.listen(Server.request_queue_size)
        except OSError as e:
            self.sock.close()
            if e.errno == errno.EADDRINUSE:
                sys.exit("nfapi: another server listens on %s" % self.path)
            sys.exit("nfapi: cannot listen on %s: %s" % (self.path, e.strerror or e))

    def close(self):
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def check_socket_folder(folder):
    """Only its owner may enter the socket's folder: the socket's own mode is not checked by every
    system, and nobody else may replace the socket. A missing folder is made (the README suggests
    <data>/nfapi.sock, and the data folder may not exist yet)."""
    if not hasattr(socket, "SO_PEERCRED"):
        sys.exit("nfapi: --unix-socket needs SO_PEERCRED, which this system lacks (it is Linux's)")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        sys.exit("nfapi: cannot make %s for the Unix socket: %s" % (folder, e.strerror))
    st = os.stat(folder)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        sys.exit("nfapi: the Unix socket's folder %s must be yours and closed to others (chmod 700 %s)"
                 % (folder, folder))


def remove_stale_socket(path):
    """Remove a socket left by a server that was killed (nobody listens on it); exit when one listens
    or when `path` is something else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        sys.exit("nfapi: %s exists and is not a socket; move it away or choose another --unix-socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)  # a live server with a full backlog makes connect() wait
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    finally:
        probe.close()
    sys.exit("nfapi: another server listens on %s" % path)


def peer_uid(sock):
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def tcp_address(server):
    """host:port of our TCP listener, as Nextflow beside a worker on this node reaches it."""
    host, port = server.server_address[:2]
    return "%s:%d" % ("127.0.0.1" if host == "0.0.0.0" else host, port)


# ==== Waiting room ====

WAITING_ROOM_SIZE = 10000  # connections
WAITING_ROOM_BYTES = 32 * 1024 * 1024  # of partial heads: what 512 threads could hold before
REFUSAL_LOG_SECONDS = 10


def raise_descriptor_limit():
    """Raise the soft limit on open descriptors to the hard one: every waiting connection holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def descriptors_short(connections):
    """Whether `connections` take three quarters of the descriptor limit: the last quarter is kept
    for the rest of the server (files, SQLite)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit != resource.RLIM_INFINITY and connections >= limit - limit // 4


class Refusals:
    """Connections the server turned away, counted and written to stderr at most once every
    REFUSAL_LOG_SECONDS: a flood must not become a flood of log lines. `last` (time.time()) tells
    the lease reaper that the server itself may have refused a heartbeat."""

    SHORT = "closed %d connections without a request head in the last %d s (oldest first; descriptors short)"
    FULL = "closed %d connections without a request head in the last %d s (oldest first; waiting room full)"
    BUSY = "answered %d requests with 503 in the last %d s (max_connections requests in progress)"
    FOREIGN = "closed %d connections to the Unix socket from other users in the last %d s"

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.written = -REFUSAL_LOG_SECONDS
        self.last = 0.0

    def count(self, reason):
        with self.lock:
            self.counts[reason] += 1
            self.last = time.time()
        self.write_due()

    def write_due(self, now=False):
        """Write the counts once the last lines are REFUSAL_LOG_SECONDS old, or `now`; return the
        time.monotonic() at which counts not written yet are due, or None."""
        with self.lock:
            if self.counts and (now or time.monotonic() - self.written >= REFUSAL_LOG_SECONDS):
                for reason, count in sorted(self.counts.items()):
                    sys.stderr.write("nfapi: %s\n" % (reason % (count, REFUSAL_LOG_SECONDS)))
                self.counts.clear()
                self.written = time.monotonic()
            return self.written + REFUSAL_LOG_SECONDS if self.counts else None


def oldest(connections):
    return next(iter(connections.values()))


class Waiting:
    """A connection in the waiting room: what it sent so far and until when (time.monotonic()) it may wait."""

    __slots__ = ("sock", "address", "data", "deadline")

    def __init__(self, sock, address, data, deadline):
        self.sock, self.address, self.data, self.deadline = sock, address, data, deadline


class WaitingRoom:
    """Connections that have not sent a whole request head cost a descriptor here, not a thread.

    One thread (the main one) watches the listening socket and every connection between requests
    with a selector. New connections, and keep-alive ones between requests, wait here until their
    request head is whole, then go to a handler thread with the bytes read so far
    (Server.start_request). A head must be whole within `header_timeout` of the wait's start.
    When descriptors run short or the room is full, the connections that have waited longest are
    closed first: a client that sends its head at once is never among them. Connections answered
    before their body was read linger here (Connection.close), and are closed first of all.
    """

    def __init__(self, server):
        self.server, self.app = server, server.app
        self.selector = selectors.DefaultSelector()
        self.waiting = collections.OrderedDict()  # fd -> Waiting, longest waiting first
        self.lingering = collections.OrderedDict()  # fd -> Waiting, the same
        self.buffered = 0  # bytes of the heads in `waiting`
        self.handed_back = collections.deque()  # (sock, address, data or None to linger) from handler threads
        self.wake_reader, self.wake_writer = socket.socketpair()
        for sock in (server.socket, self.wake_reader, self.wake_writer):
            sock.setblocking(False)
        self.selector.register(server.socket, selectors.EVENT_READ, self.accept)
        if server.unix:
            server.unix.sock.setblocking(False)
            self.selector.register(server.unix.sock, selectors.EVENT_READ, self.accept)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, self.take_back)

    def run(self):
        """Until the server stops."""
        try:
            while not self.server.stopping:
                for key, _ in self.selector.select(self.timeout()):
                    key.data(key.fileobj)
                self.expire()
        finally:
            self.close()

    def wake(self):
        """Safe in a signal handler."""
        with contextlib.suppress(OSError):  # a full socket pair: a wake-up is pending anyway
            self.wake_writer.send(b"\0")

    def timeout(self):
        due = [oldest(group).deadline for group in (self.waiting, self.lingering) if group]
        log_due = self.app.refusals.write_due()
        if log_due is not None:
            due.append(log_due)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def expire(self):
        now = time.monotonic()
        for group in (self.waiting, self.lingering):
            while group and oldest(group).deadline <= now:
                self.close_one(oldest(group))

    # -- arriving --

    def accept(self, listener):
        for _ in range(64):  # a burst at a time: the connections already here are served in between
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and not self.evict(Refusals.SHORT):
                    # Requests in progress hold every descriptor: nothing to do but try again soon.
                    time.sleep(0.01)
                return
            self.admit(sock, address)

    def admit(self, sock, address):
        if sock.family == socket.AF_UNIX:
            if peer_uid(sock) != os.getuid():
                sock.close()
                return self.app.refusals.count(Refusals.FOREIGN)
            address = UNIX_PEER
        else:
            # Heads and bodies sent in separate writes must not wait for the client's delayed ACK
            # (Nagle's algorithm: 40 ms per answer on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The socket stays blocking and the kernel enforces the timeouts (SO_RCVTIMEO, SO_SNDTIMEO).
        # A Python socket timeout polls before every receive and send, and each poll gives up the
        # GIL once more: a fifth of a weblog post's cost with 16 runs posting at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self.app.config["client_timeout"]))
        entry = self.wait(sock, address, b"")
        self.make_room()
        if sock.fileno() in self.waiting:
            self.read(entry)  # the head often comes with the connection

    def wait(self, sock, address, data):
        entry = Waiting(sock, address, bytearray(data), time.monotonic() + self.app.config["header_timeout"])
        self.waiting[sock.fileno()] = entry
        self.buffered += len(data)
        self.selector.register(sock, selectors.EVENT_READ, lambda _: self.read(entry))
        return entry

    def read(self, entry):
        try:
            data = entry.sock.recv(MAX_HEAD_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            return self.close_one(entry)
        if not data:  # the client closed it; a head cut short gets its 400 from a handler thread
            return self.hand_off(entry) if entry.data else self.close_one(entry)
        searched = len(entry.data)
        entry.data += skip_blank_lines(data) if not searched else data
        self.buffered += len(entry.data) - searched
        try:
            whole = find_head(entry.data, searched) is not None
        except ApiError:
            whole = True  # a handler thread answers 414 or 431
        if whole:
            self.hand_off(entry)
        else:
            self.make_room()

    def hand_off(self, entry):
        self.forget(entry)
        if not self.server.start_request(entry.sock, entry.address, bytes(entry.data)):
            with contextlib.suppress(OSError):  # a few hundred bytes: a new socket's buffer takes them
                entry.sock.send(BUSY_ANSWER, socket.MSG_DONTWAIT)
            self.app.refusals.count(Refusals.BUSY)
            self.linger(entry.sock, entry.address)

    # -- coming back from handler threads --

    def give_back(self, sock, address, data):
        """From a handler thread: `sock` waits here for its next request head, of which `data` came
        already; with data None it lingers and closes."""
        if self.server.stopping:
            sock.close()
            return
        self.handed_back.append((sock, address, data))
        self.wake()

    def take_back(self, wake_reader):
        with contextlib.suppress(OSError):
            wake_reader.recv(4096)
        while self.handed_back:
            sock, address, data = self.handed_back.popleft()
            if data is None:
                self.linger(sock, address)
            else:
                self.wait(sock, address, data)
                self.make_room()

    # -- leaving --

    def linger(self, sock, address):
        """After answering before the body was read, keep reading (and dropping) it for a moment.

        Closing a socket with unread input sends a TCP reset, which can destroy our answer before
        the client reads it; a client still busy sending would see only a broken pipe.
        """
        entry = Waiting(sock, address, None, time.monotonic() + LINGER_SECONDS)
        self.lingering[sock.fileno()] = entry
        self.selector.register(sock, selectors.EVENT_READ, lambda _: self.drain(entry))

    def drain(self, entry):
        try:
            if entry.sock.recv(READ_CHUNK, socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close_one(entry)

    def make_room(self):
        """Close connections while the room is over its size or descriptors run short. Connections
        on handler threads count, as each holds a descriptor too."""
        while True:
            held = len(self.waiting) + len(self.lingering)
            if descriptors_short(held + self.server.busy):
                reason = Refusals.SHORT
            elif held > WAITING_ROOM_SIZE or self.buffered > WAITING_ROOM_BYTES:
                reason = Refusals.FULL
            else:
                return
            if not self.evict(reason):
                return

    def evict(self, reason):
        """Close the connection that has waited longest: one lingering after its answer, else one
        without a whole request head (counted as refused); False when there is none."""
        if self.lingering:
            self.close_one(oldest(self.lingering))
        elif self.waiting:
            self.close_one(oldest(self.waiting))
            self.app.refusals.count(reason)
        else:
            return False
        return True

    def forget(self, entry):
        self.selector.unregister(entry.sock)
        if entry.data is None:
            del self.lingering[entry.sock.fileno()]
        else:
            del self.waiting[entry.sock.fileno()]
            self.buffered -= len(entry.data)

    def close_one(self, entry):
        self.forget(entry)
        entry.sock.close()

    def close(self):
        for group in (self.waiting, self.lingering):
            while group:
                self.close_one(oldest(group))
        while self.handed_back:
            self.handed_back.popleft()[0].close()
        self.selector.close()
        self.wake_reader.close()
        self.wake_writer.close()
        self.app.refusals.write_due(now=True)


# ==== Requests ====

def hmac_hex(token, text):
    return hmac.new(token.encode(), text.encode(), "sha256").hexdigest()


class SeenNonces:
    """The nonces of the worker requests taken in the last 2 * WORKER_CLOCK_SKEW seconds: a request is
    taken once. Only requests signed with the token get here, at most MAX_WORKER_NONCES of them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = collections.OrderedDict()  # nonce -> when it was taken (monotonic), oldest first

    def first_use(self, nonce):
        """Whether `nonce` is new (it is remembered now); 503 while too many are remembered."""
        now = time.monotonic()
        with self.lock:
            while self.seen and next(iter(self.seen.values())) < now - 2 * WORKER_CLOCK_SKEW:
                self.seen.popitem(last=False)
            if nonce in self.seen:
                return False
            if len(self.seen) >= MAX_WORKER_NONCES:
                raise ApiError(503, "token", "too many worker requests; try again in a minute",
                               {"Retry-After": "60"})
            self.seen[nonce] = now
            return True


class Request:
    """One request as its route handler sees it: the head, the query, who sent it, and the body,
    read on demand and never past Content-Length."""

    def __init__(self, conn):
        self.conn, self.app = conn, conn.app
        self.requestline = self.command = self.path = None
        self.headers = {}
        self.keep_alive = False
        self.body_left = None  # bytes of the body not read yet; None until the request is framed
        self.json_body = self.query_params = None
        self.json_text = b""  # the body json() parsed
        self.prepared = False
        self.read_only = False  # authenticated with the read-only token, or following a link it asked for
        self.link = None  # the download link a ticket route follows (DownloadLinks.find)
        self.worker_nonce = self.worker_body_sha256 = None  # set by a worker's signed request

    def parse(self, head):
        """Read a request head (without its blank line). Header names are lower-cased; a repeated
        field's values are joined with ", " (RFC 9110 5.3), so a second Content-Length makes the
        length invalid."""
        lines = head.decode("latin-1").split("\n")
        self.requestline = lines[0].rstrip("\r")
        request = REQUEST_LINE.fullmatch(self.requestline)
        if not request:
            raise ApiError(400, "request", "bad request line")
        self.command, self.path = request.group(1), request.group(2)
        version = "HTTP/%s.%s" % request.group(3, 4)
        if request.group(3) >= "2":
            raise ApiError(505, "request", "this server speaks HTTP/1.1")
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise ApiError(400, "request", "bad HTTP version")
        if len(lines) > MAX_HEADER_LINES + 1:
            raise ApiError(431, "request", "more than %d header lines" % MAX_HEADER_LINES)
        for line in lines[1:]:
            field = HEADER_LINE.fullmatch(line)
            if not field:
                raise ApiError(400, "request", "bad header line: %r" % line[:200])
            name, value = field.group(1).lower(), field.group(2)
            self.headers[name] = self.headers[name] + ", " + value if name in self.headers else value
        self.http11 = version == "HTTP/1.1"
        options = {option.strip() for option in self.headers.get("connection", "").lower().split(",")}
        self.keep_alive = "close" not in options and (self.http11 or "keep-alive" in options)

    def prepare(self):
        """Frame the body, route and authenticate; runs once.

        An unauthenticated client gets 401 whatever the path, so routes cannot be probed.
        """
        if self.prepared:
            return
        self.prepared = True
        self.body_left = self.parse_content_length()
        url = urllib.parse.urlsplit(self.path)
        self.url_path, self.query_string = url.path, url.query
        try:
            self.route = match_route(self.command, self.url_path)
        except ApiError:
            self.authenticate()
            raise
        handler, params = self.route
        if getattr(handler, "ticket_auth", False):
            self.link = self.app.download_links.find(params["ticket"])
            self.read_only = self.link.read_only
        elif not (getattr(handler, "run_secret_auth", False) or getattr(handler, "public", False)):
            self.authenticate(reads_only=getattr(handler, "reads_only", False))

    def authenticate(self, reads_only=False):
        """The API token allows everything; the optional read-only token allows GET and `reads_only` POSTs;
        the owner on the Unix socket needs neither. The worker shows the API token without sending it
        (worker_mac_problem)."""
        if self.from_owner():
            return
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "nfapi-hmac":
            problem = self.worker_mac_problem(token)
            if problem is None:
                return
            raise ApiError(401, "token", problem, {"WWW-Authenticate": 'Bearer realm="nfapi"'})
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        if hmac.compare_digest(token, self.app.token.encode()):
            return
        if self.app.read_token and hmac.compare_digest(token, self.app.read_token.encode()):
            if self.command == "GET" or reads_only:
                self.read_only = True
                return
            raise ApiError(403, "token", "this token is read-only")
        message = "missing or wrong API token (Authorization: Bearer <token>)"
        if self.over_unix_socket():
            message += "; on the Unix socket none is needed with Host: localhost (any port) and no Origin, " \
                       "the page's own or one listed in cors_origins"
        raise ApiError(401, "token", message, {"WWW-Authenticate": 'Bearer realm="nfapi"'})

    def over_unix_socket(self):
        return self.conn.client_address == UNIX_PEER

    def from_owner(self):
        """Over the Unix socket (so from our own uid), and not from a web page elsewhere: a loopback
        Host or none, and no Origin, or a listed one, or our own page's (the Host's: a browser sends
        its Origin with a POST even to the page's own server)."""
        host = self.headers.get("host", "localhost")
        origin = self.headers.get("origin")
        return (self.over_unix_socket() and LOOPBACK_HOST.fullmatch(host) is not None
                and origin in (None, "http://" + host) + tuple(self.app.config["cors_origins"]))

    def worker_mac_problem(self, credentials):
        """Why `Nfapi-HMAC nonce=<hex>, time=<unix seconds>, mac=<hex>` does not stand for the API token,
        or None. The worker never sends the token: whoever holds our port while we are down (a restart,
        a crash) would get it. It sends an HMAC-SHA256, keyed with the token, of the method, the path,
        the nonce, the time and the body's SHA-256 (X-Nfapi-Body-SHA256, checked against the body in
        body_chunks); a nonce is taken once, so a request seen cannot be sent again. Every answer to
        such a request is signed in turn (answer_proof): the worker obeys no answer we did not sign."""
        found = WORKER_MAC.fullmatch(credentials.strip())
        body_sha256 = self.headers.get("x-nfapi-body-sha256", "")
        if not found or not re.fullmatch(r"[0-9a-f]{64}", body_sha256):
            return "a malformed Nfapi-HMAC authorization, or no X-Nfapi-Body-SHA256"
        nonce, when, mac = found.groups()
        if abs(time.time() - int(when)) > WORKER_CLOCK_SKEW:
            return ("the worker's clock is more than %d s from the server's: set both clocks right (NTP)"
                    % WORKER_CLOCK_SKEW)
        signed = "\n".join((self.command, self.path, nonce, when, body_sha256))
        if not hmac.compare_digest(mac, hmac_hex(self.app.token, signed)):
            return "the Nfapi-HMAC was not made with the API token"
        if not self.app.worker_nonces.first_use(nonce):
            return "this worker request was already received once (a nonce is used once)"
        self.worker_nonce, self.worker_body_sha256 = nonce, body_sha256
        return None

    def answer_proof(self, status, data):
        """X-Nfapi-Proof of an answer to a worker request: that we, who know the token, sent it."""
        return hmac_hex(self.app.token, "answer\n%s\n%d\n%s" % (self.worker_nonce, status,
                                                                   hashlib.sha256(data).hexdigest()))

    @contextlib.contextmanager
    def answer_first(self, status, entry):
        """Send the answer `status` (no body) now, and make the with-block's writes after it, once
        `entry` says what they are in the promises file (Database.promise); else answer after them,
        as every other request. The weblog's sender waits for each answer: its next post travels
        while this one is written. Only the one request in progress answers first: with others, posts
        share commits (write_together), and a promise's write() is one more hand-over of the GIL
        among the threads (16 senders lost a sixth of their rate).

        Every request that reads or writes waits for the promise: only what the socket takes at once
        is sent while it is open, the rest once the handler returns (send_answer_early). A client
        that stops reading its answers (a full socket) would hold them all for client_timeout."""
        if self.conn.server.busy > 1:
            yield
            return
        with self.app.db.promise(entry) as promised:
            if promised:
                try:
                    self.conn.send_answer_early(self, status)
                except CLIENT_GONE:  # the request came whole: it counts though its sender left
                    self.conn.close_connection = True
            yield

    @contextlib.contextmanager
    def slot_share(self):
        """Hold the request's share of the server's slots while it is handled and answered: 503
        when the read-only token's requests hold their share already (see read_only_share)."""
        if not self.read_only:
            yield
            return
        with self.app.read_only_slots.hold(read_only_share(self.app.config["max_connections"])) as held:
            if not held:
                raise ApiError(503, "token", "the read-only token's requests hold half of the server's slots; "
                                             "try again in a moment", {"Retry-After": "1"})
            yield

    def weblog_secret(self):
        token = self.query().get("token")
        scheme, _, credentials = self.headers.get("authorization", "").partition(" ")
        if token is None and scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                token = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        return token or ""

    def parse_content_length(self):
        if "transfer-encoding" in self.headers:
            raise ApiError(411, "body", "chunked bodies are not supported; send Content-Length")
        value = self.headers.get("content-length", "0")
        if not re.fullmatch(r"[0-9]{1,18}", value):
            raise ApiError(400, "body", "bad Content-Length")
        return int(value)

    def db(self):
        return self.app.db.connection()

    def body_chunks(self):
        """The body as it arrives. All of it must come within client_timeout seconds plus its
        length at MIN_BODY_RATE, and no receive may wait longer than client_timeout."""
        deadline = time.monotonic() + self.app.config["client_timeout"] + self.body_left / MIN_BODY_RATE
        digest = hashlib.sha256() if self.worker_body_sha256 else None
        while self.body_left:
            chunk = self.conn.receive(min(READ_CHUNK, self.body_left), deadline)
            self.body_left -= len(chunk)
            if digest:
                digest.update(chunk)
            yield chunk
        if digest and not hmac.compare_digest(digest.hexdigest(), self.worker_body_sha256):
            raise ApiError(401, "token", "the body is not the one the worker signed (X-Nfapi-Body-SHA256)")

    def json(self):
        """The body as a JSON object (an empty body is `{}`); 413 over max_json_bytes."""
        if self.json_body is None:
            if self.body_left > self.app.config["max_json_bytes"]:
                raise ApiError(413, "body", "JSON bodies are limited to %d bytes" % self.app.config["max_json_bytes"])
            self.json_text = data = b"".join(self.body_chunks())
            self.json_body = json_body(data)
            if not isinstance(self.json_body, dict):
                raise ApiError(422, "body", "must be a JSON object")
            check_known_keys(self.route[0], self.json_body)
        return self.json_body

    def query(self):
        if self.query_params is None:
            try:
                self.query_params = dict(urllib.parse.parse_qsl(self.query_string, keep_blank_values=True,
                                                                errors="strict"))
            except (UnicodeDecodeError, ValueError):
                raise ApiError(400, "query", "bad percent-encoding in the query string")
        return self.query_params

    def query_str(self, name, default):
        return self.query().get(name, default)

    def query_bool(self, name):
        value = self.query().get(name, "false")
        if value not in ("true", "false"):
            raise ApiError(422, name, "must be true or false")
        return value == "true"

    def query_int(self, name, default):
        value = self.query().get(name)
        if value is None:
            return default
        if not re.fullmatch(r"[0-9]{1,18}", value):
            raise ApiError(422, name, "must be a non-negative integer")
        return int(value)


# ==== Connections ====

class SocketWriter:
    """Where answers are written: each write is sent whole, nothing is buffered."""

    def __init__(self, sock):
        self.sock = sock

    def write(self, data):
        self.sock.sendall(data)
        return len(data)

    def write_at_once(self, data):
        """Send what the socket takes without waiting; return the rest."""
        try:
            return data[self.sock.send(data, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            return data

    def flush(self):
        pass


class Connection:
    """A connection on a handler thread: HTTP/1.1 keep-alive, a Content-Length on every answer,
    JSON errors.

    It gets a connection whose request head is whole from the waiting room, with the bytes read so
    far, and answers requests as long as they come back to back; then the connection goes back to
    the waiting room, lingers there, or is closed. It holds one of the server's max_connections
    slots while it handles a request, not while it waits for the next one.

    The body is read only by the handler that needs it, never past Content-Length. When an answer
    leaves before the whole body was read, the connection is closed: otherwise the unread bytes
    would be parsed as the next request. Once an answer's status line has gone out, a failure can
    only abort the connection: a second answer would land inside the first one's body.
    """

    current_receive_timeout = None

    def __init__(self, server, sock, address, data):
        self.server, self.app = server, server.app
        self.connection, self.client_address = sock, address
        self.wfile = SocketWriter(sock)
        self.buffer = data  # received and not used yet: the next head, or the body's first bytes
        self.close_connection = False
        self.unread_input = False  # a body not read: closing must linger, or the answer may be lost
        self.answer_started = False
        self.unsent = b""  # the rest of an answer started early (send_answer_early)

    def serve(self):
        """Answer requests until the connection closes or has no whole head within KEEP_ALIVE_WAIT
        of the last answer. The caller took a slot for the first request."""
        holding = True
        try:
            while True:
                try:
                    head = self.read_head(time.monotonic() + KEEP_ALIVE_WAIT)
                except ApiError as e:
                    head = e
                if head is None:
                    return self.close() if self.close_connection else self.give_back()
                if not holding and not self.server.take_slot():
                    return self.refuse_busy()
                holding = True
                self.handle(head)
                self.server.release_slot()
                holding = False
                if self.close_connection or self.server.stopping:
                    return self.close()
        finally:
            if holding:
                self.server.release_slot()

    # -- reading request heads --

    def read_head(self, deadline):
        """The next request head, without its blank line; None when it is not whole by `deadline`,
        or when the client closed the connection (close_connection is then set). 400, 414 or 431
        for a head that is cut short or too long."""
        searched = 0
        while True:
            self.buffer = skip_blank_lines(self.buffer)
            end = find_head(self.buffer, searched)
            if end:
                head, self.buffer = self.buffer[:end.start()], self.buffer[end.end():]
                return head
            searched = len(self.buffer)
            if time.monotonic() >= deadline:
                return None
            # A blocking receive with a kernel timeout costs one system call and one wait for the
            # GIL; a poll before it cost a tenth of a weblog post.
            self.receive_timeout(KEEP_ALIVE_WAIT)
            try:
                data = self.connection.recv(READ_CHUNK)
            except BlockingIOError:  # nothing came within KEEP_ALIVE_WAIT
                return None
            except CLIENT_GONE:
                data = b""
            if not data:
                self.close_connection = True
                if self.buffer:
                    raise ApiError(400, "request", "the connection was closed inside the request head")
                return None
            self.buffer += data

    def receive(self, size, deadline):
        """Up to `size` bytes of a request body, the ones that came with the head first; ClientGone
        when the client closed the connection, stalled for client_timeout, or is past the body's
        `deadline`.

        The receive timeout stays KEEP_ALIVE_WAIT, as it was for the head, while the body comes
        at once; it is raised only for a body that is slow to come (in whole seconds, so that it
        is not set again and again).
        """
        if self.buffer:
            chunk, self.buffer = self.buffer[:size], self.buffer[size:]
            return chunk
        patient = self.current_receive_timeout != KEEP_ALIVE_WAIT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientGone()
            if patient:
                self.receive_timeout(min(self.app.config["client_timeout"], math.ceil(remaining)))
            try:
                chunk = self.connection.recv(size)
            except BlockingIOError:
                if patient:
                    raise ClientGone()
                patient = True
                continue
            except CLIENT_GONE:
                raise ClientGone()
            if not chunk:
                raise ClientGone()
            return chunk

    def receive_timeout(self, seconds):
        """Set SO_RCVTIMEO, but only when it changes: setsockopt keeps the GIL while it waits for
        the socket's lock, which the kernel holds while packets arrive."""
        if seconds != self.current_receive_timeout:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self.current_receive_timeout = seconds

    # -- dispatch --

    def handle(self, head):
        """Answer one request; `head` is its head, or the ApiError that reading it raised."""
        req = Request(self)
        self.answer_started, self.unsent = False, b""
        try:
            if isinstance(head, ApiError):
                raise head
            req.parse(head)
            self.close_connection = not req.keep_alive
            if req.headers.get("expect", "").lower() == "100-continue" and req.http11:
                if not self.continue_or_refuse(req):
                    return
            if req.command == "OPTIONS":
                self.preflight(req)
            else:
                self.dispatch(req)
        except ApiError as e:  # a malformed head: the rest of the input means nothing
            self.close_connection = True
            self.send_api_error(req, e)
        except CLIENT_GONE:
            self.close_connection = True
        finally:
            self.unread_input = req.body_left != 0
            self.close_connection = self.close_connection or self.unread_input

    def continue_or_refuse(self, req):
        """Refuse a bad token or an oversized body before the client sends it (RFC 9110 10.1.1)."""
        try:
            req.prepare()
        except ApiError as e:
            self.send_api_error(req, e)
            return False
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def dispatch(self, req):
        """Run the route's handler and answer; the one place that turns errors into answers."""
        try:
            req.prepare()
            handler, params = req.route
            with req.slot_share():
                status, body = handler(req, **params)
                if not self.answer_started:
                    self.send_answer(req, status, body)
                elif self.unsent:  # see send_answer_early
                    self.wfile.write(self.unsent)
        except (ClientGone,) + CLIENT_GONE:
            self.close_connection = True
        except Exception as e:
            if self.answer_started:
                self.abort(req, e)
            elif isinstance(e, ApiError):
                self.send_api_error(req, e)
            else:
                sys.stderr.write("internal error on %s %r\n%s" % (req.command, redact(req.path), traceback.format_exc()))
                self.send_api_error(req, ApiError(500, "general", "internal error"))

    def preflight(self, req):
        """A CORS preflight from a listed origin; anything else is an ordinary (unauthenticated) request."""
        cors = self.cors_headers(req)
        if not cors or "access-control-request-method" not in req.headers:
            return self.dispatch(req)
        req.body_left = 0
        self.send_answer(req, 204, None, {"Access-Control-Allow-Methods": "GET, POST",
                                          "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                          "Access-Control-Max-Age": "600"})

    # -- answers --

    def send_answer(self, req, status, body, headers=None):
        """Send `body`: a dict as JSON, None as nothing, a Body as its own content."""
        if not isinstance(body, Body):
            body = Body.json(body)
        head = self.answer_head(req, status, body, headers)
        if req.command == "HEAD":
            self.wfile.write(head)
        elif body.data is not None:
            self.wfile.write(head + body.data)  # one write, one packet for a small answer
        else:
            self.wfile.write(head)
            body.write_to(self)

    def send_answer_early(self, req, status):
        """Start an answer without a body while the handler runs, sending what the socket takes
        without waiting; dispatch sends the rest (see Request.answer_first)."""
        self.unsent = self.wfile.write_at_once(self.answer_head(req, status, Body.json(None), None))

    def answer_head(self, req, status, body, headers):
        """The head of an answer, which starts now."""
        fields = dict(body.headers)
        fields.update(headers or {})
        fields.update(self.cors_headers(req))
        fields["X-Content-Type-Options"] = "nosniff"
        if req.worker_nonce and body.data is not None:
            fields["X-Nfapi-Proof"] = req.answer_proof(status, body.data)
        if body.length is None:
            fields["Transfer-Encoding"] = "chunked"
        else:
            fields["Content-Length"] = str(body.length)
        if req.body_left != 0 or self.close_connection:
            fields["Connection"] = "close"
            self.close_connection = True
        head = ("HTTP/1.1 %d %s\r\nServer: nfapi\r\nDate: %s\r\n%s\r\n" % (
            status, http.HTTPStatus(status).phrase, http_date(int(time.time())),
            "".join("%s: %s\r\n" % field for field in fields.items()))).encode("latin-1")
        self.log_request(req, status, body.length)
        self.answer_started = True
        return head

    def cors_headers(self, req):
        """CORS is off unless the configuration lists the origin (a browser page elsewhere must not
        use the token of a user whose browser happens to hold it)."""
        origin = req.headers.get("origin")
        if origin is None or origin not in self.app.config["cors_origins"]:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "X-Next-Offset, X-Log-Size, X-Run-Status, X-Run-Id, "
                                                 "Content-Disposition, Content-Range, ETag"}

    def send_api_error(self, req, error):
        try:
            self.send_answer(req, error.status, {"errors": error.errors}, error.headers)
        except CLIENT_GONE:
            self.close_connection = True

    def abort(self, req, error):
        """After the status line went out, a failure can only cut the connection: the client sees a
        body shorter than announced, or a chunked one without its last chunk."""
        sys.stderr.write("nfapi: aborted %s: %s: %s\n" % (redact(req.requestline), type(error).__name__, error))
        self.close_connection = True
        req.body_left = 0  # no lingering: the answer is broken anyway

    def refuse_busy(self):
        """A next request while max_connections requests are in progress."""
        self.app.refusals.count(Refusals.BUSY)
        with contextlib.suppress(*CLIENT_GONE):
            self.wfile.write(BUSY_ANSWER)
        self.unread_input = True
        self.close()

    def log_request(self, req, status, size):
        if not self.app.quiet:
            sys.stderr.write('%s - - [%s] "%s" %s %s\n' % (self.client_address[0], time.strftime("%d/%b/%Y %H:%M:%S"),
                                                          redact(req.requestline or ""), status,
                                                          "-" if size is None else size))

    # -- leaving --

    def give_back(self):
        """Back to the waiting room until the next request head is whole."""
        self.server.room.give_back(self.connection, self.client_address, self.buffer)

    def close(self):
        """Close it, or let it linger in the waiting room while the client may still be sending."""
        if not self.unread_input:
            self.connection.close()
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        self.server.room.give_back(self.connection, self.client_address, None)


class Server(socketserver.TCPServer):
    """The listening socket, the waiting room, and a thread for each request in progress: at most
    `max_connections` at once. Past that, a request gets 503 with Retry-After at once instead of a
    thread, and the server never falls over.

    Handler threads are reused: starting a thread makes the starter wait until the new one runs,
    and with hundreds of threads busy that wait held up the waiting room for everyone.
    """

    allow_reuse_address = True
    # socketserver's default backlog of 5 makes a burst of connections wait out SYN retransmits.
    request_queue_size = 1024

    def __init__(self, address, app=None):
        self.app = app  # may come after the socket is bound: set it before serve_forever
        self.busy = 0  # slots taken: requests in progress
        self.slots = threading.Condition()
        self.arrivals = queue.SimpleQueue()  # (sock, address, data) for the next free handler thread
        self.idle = 0  # handler threads waiting for an arrival that none is promised to yet
        self.stopping = False
        self.room = None
        self.unix = None  # the UnixListener, with --unix-socket
        super().__init__(address, None)

    def serve_forever(self):
        """Serve until shutdown(); then stop accepting and close the connections without a request."""
        self.room = WaitingRoom(self)
        try:
            self.room.run()
        finally:
            self.server_close()

    def shutdown(self):
        """Make serve_forever return. Safe in a signal handler; unlike socketserver's, it does not
        wait for serve_forever to return."""
        self.stopping = True
        if self.room:
            self.room.wake()

    def start_request(self, sock, address, data):
        """A thread for a connection whose request head is whole; False when all slots are taken."""
        with self.slots:
            if self.stopping or self.busy >= self.app.config["max_connections"]:
                return False
            self.busy += 1
            start = not self.idle
            self.idle -= not start
        self.arrivals.put((sock, address, data))
        if start:
            threading.Thread(target=self.handle_arrivals, daemon=True).start()
        return True

    def handle_arrivals(self):
        """Serve connections as they arrive; end after THREAD_IDLE_SECONDS without one. Each idle
        thread counts in `idle` until an arrival is promised to it: one that times out while every
        idle thread is promised one waits for its own."""
        while True:
            try:
                sock, address, data = self.arrivals.get(timeout=THREAD_IDLE_SECONDS)
            except queue.Empty:
                with self.slots:
                    if self.idle:
                        self.idle -= 1
                        return
                continue
            Connection(self, sock, address, data).serve()
            with self.slots:
                self.idle += 1

    def take_slot(self):
        with self.slots:
            if self.stopping or self.busy >= self.app.config["max_connections"]:
                return False
            self.busy += 1
            return True

    def release_slot(self):
        with self.slots:
            self.busy -= 1
            self.slots.notify_all()

    def wait_for_requests(self, timeout):
        """Whether the requests in progress ended within `timeout` seconds."""
        with self.slots:
            return self.slots.wait_for(lambda: self.busy == 0, timeout)


class App:
    """Everything the handlers share: configuration, token, database, folders, notifications and
    Socket.IO sessions."""

    def __init__(self, config, data_dir, quiet=False):
        self.config = config
        self.quiet = quiet
        self.data_dir = os.path.abspath(data_dir)
        refuse_foreign_folder(self.data_dir)
        make_private_dir(self.data_dir)
        self.lock_fd = lock_data_folder(self.data_dir)  # before anything in it changes
        os.chmod(self.data_dir, 0o700)
        for sub in ("workflows", "launch", "runs", "tmp"):
            make_private_dir(os.path.join(self.data_dir, sub))
        self.tmp_dir = os.path.join(self.data_dir, "tmp")
        self.token, self.token_source = load_token(self.data_dir)
        self.read_token = load_read_token(self.data_dir)
        self.download_links = DownloadLinks()
        self.db = Database(os.path.join(self.data_dir, "nfapi.sqlite3"))
        self.changes = Changes()
        self.sockets = SocketIO(self)
        self.stopping = threading.Event()
        self.weblog_runs = {}  # run id -> (its weblog_run row, when it was read): see known_weblog_run
        self.courier = Courier(self)
        self.refusals = Refusals()
        self.worker_nonces = SeenNonces()
        self.read_only_slots = Share()  # see Request.slot_share
        self.long_polls = Share()  # see answer_when_ended
        keep_weblog_promises(self)
        remember_failed_tasks_left_out(self)
        self.reconcile()
        threading.Thread(target=self.reap_forever, name="lease-reaper", daemon=True).start()
        self.courier.thread.start()

    def workflow_dir(self, workflow_id):
        return os.path.join(self.data_dir, "workflows", str(workflow_id))

    def launch_dir(self, workflow_id):
        return os.path.join(self.data_dir, "launch", str(workflow_id))

    def run_dir(self, run_id):
        return os.path.join(self.data_dir, "runs", str(run_id))

    def open_run_file(self, run_id, name):
        """<data>/runs/<run_id>/<name>, see open_below."""
        return open_below(self.data_dir, ["runs", str(run_id), name])

    def open_launch_file(self, workflow_id, name):
        """<data>/launch/<workflow_id>/<name>, see open_below."""
        return open_below(self.data_dir, ["launch", str(workflow_id), name])

    def reap_lost_runs(self):
        """Runs whose worker stopped sending heartbeats are `lost`, with the reason recorded.
        (A claim never confirmed started no nextflow: requeue_unconfirmed_claims puts it back.)

        Not while the server itself turned connections away within the last lease (a 503, or the
        waiting room closing connections): the missing heartbeats may be ones it refused. Leases
        are judged again one lease after the last refusal, when live workers have got through.
        """
        now = time.time()
        if now - self.refusals.last < self.config["lease_seconds"]:
            return
        with self.db.write() as conn:
            lost = conn.execute("SELECT id, workflow_id FROM runs WHERE status = 'running' AND lease_until < ? "
                                "AND confirmed_at IS NOT NULL", (now,)).fetchall()
            conn.execute("UPDATE runs SET status = 'lost', finished_at = ?, error_message = ? "
                         "WHERE status = 'running' AND lease_until < ? AND confirmed_at IS NOT NULL",
                         (now, "the worker stopped sending heartbeats", now))
            queue_notifications(self, conn, [run["id"] for run in lost])
        if lost:
            self.changes.notify(*[run["workflow_id"] for run in lost])

    def requeue_unconfirmed_claims(self):
        """A claim its worker did not confirm within `claim_confirm_seconds` goes back to the queue.
        The worker starts nextflow only after confirming, so nothing runs for it: the worker stopped
        with its poll open, or the answer never reached it."""
        now = time.time()
        with self.db.write() as conn:
            requeued = conn.execute("UPDATE runs SET %s WHERE status = 'running' AND confirmed_at IS NULL "
                                    "AND started_at < ?" % REQUEUE,
                                    (now - self.config["claim_confirm_seconds"],)).rowcount
        if requeued:
            self.changes.notify(QUEUED_RUNS)

    def reap_forever(self):
        interval = min(5.0, self.config["lease_seconds"] / 4, self.config["claim_confirm_seconds"] / 4)
        while not self.stopping.wait(interval):
            try:
                self.reap_lost_runs()
                self.requeue_unconfirmed_claims()
            except sqlite3.Error:
                traceback.print_exc()

    def open_workflow_folder(self, workflow_id):
        """The workflow's folder as a Descriptor; 404 when there is no such workflow. A folder missing
        for a workflow that exists (a crash right after create) is made again, under the write lock,
        so that a workflow deleted meanwhile is not brought back."""
        with self.db.connection() as conn:
            workflow_row(conn, workflow_id)
        path = self.workflow_dir(workflow_id)
        try:
            return Descriptor(os.open(path, FOLDER_FLAGS))
        except FileNotFoundError:
            with self.db.write() as conn:
                workflow_row(conn, workflow_id)
                make_private_dir(path)
            return Descriptor(os.open(path, FOLDER_FLAGS))

    def reconcile(self):
        """Clean up after a killed server: temp files, and folders of workflows and runs that were deleted."""
        for name in os.listdir(self.tmp_dir):
            delete_tree(os.path.join(self.tmp_dir, name))
        with self.db.write() as conn:
            workflows = {str(row[0]) for row in conn.execute("SELECT id FROM workflows")}
            runs = {str(row[0]) for row in conn.execute("SELECT id FROM runs")}
            # Workers keep running while the server is down: give them a full lease to report back.
            conn.execute("UPDATE runs SET lease_until = ? WHERE status = 'running'",
                         (time.time() + self.config["lease_seconds"],))
        for sub, known in (("workflows", workflows), ("launch", workflows), ("runs", runs)):
            parent = os.path.join(self.data_dir, sub)
            for name in os.listdir(parent):
                if name not in known:
                    remove_tree_atomically(os.path.join(parent, name), self.tmp_dir)


def load_token(data_dir):
    """The API token from $NFAPI_TOKEN, else <data>/api-token (created 0600 on first start)."""
    if os.environ.get("NFAPI_TOKEN"):
        return os.environ["NFAPI_TOKEN"], "$NFAPI_TOKEN"
    path = os.path.join(data_dir, "api-token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if not token:
            sys.exit("nfapi: %s is empty; delete it to get a new token" % path)
        return token, path
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def load_read_token(data_dir):
    """An optional read-only token (GET only): $NFAPI_READ_TOKEN, else <data>/api-read-token if present."""
    if os.environ.get("NFAPI_READ_TOKEN"):
        return os.environ["NFAPI_READ_TOKEN"]
    try:
        with open(os.path.join(data_dir, "api-read-token"), encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


# ==== Main ====

def parse_args(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Run Nextflow pipelines over HTTP.")
    parser.add_argument("--config", default=env("NFAPI_CONFIG", "example-config.json"), help="JSON configuration ($NFAPI_CONFIG)")
    parser.add_argument("--data", default=env("NFAPI_DATA", "nfapi-data"), help="data folder ($NFAPI_DATA)")
    parser.add_argument("--host", default=env("NFAPI_HOST", "127.0.0.1"), help="address to bind ($NFAPI_HOST)")
    parser.add_argument("--port", type=int, default=int(env("NFAPI_PORT", "8000")), help="port, 0 for any ($NFAPI_PORT)")
    parser.add_argument("--unix-socket", default=env("NFAPI_UNIX_SOCKET"),
                        help="also serve on this Unix socket, where its owner needs no token ($NFAPI_UNIX_SOCKET)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0 to 65535")
    return args


def listen(host, port):
    """The listening server, before anything else: a port in use must change nothing (no data
    folder, no token) and say so in one line."""
    try:
        return Server((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            sys.exit("nfapi: port %d on %s is in use; choose another with --port" % (port, host))
        sys.exit("nfapi: cannot listen on %s port %d: %s" % (host, port, e.strerror or e))


def on_stop_signals(stop):
    """Call stop(signum, frame) on SIGTERM, and on SIGINT and SIGHUP unless they were ignored when we
    started. A shell starts background jobs with SIGINT ignored: `make run` takes Ctrl-C itself and
    stops the worker before the server. nohup ignores SIGHUP: the server outlives the logout."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, stop)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        sys.exit("nfapi: configuration error in %s: %s" % (args.config, e))
    os.umask(0o077)
    raise_descriptor_limit()
    server = listen(args.host, args.port)
    server.unix = UnixListener(args.unix_socket) if args.unix_socket else None
    try:
        serve(server, config, args)
    finally:
        if server.unix:
            server.unix.close()


def serve(server, config, args):
    try:
        app = App(config, args.data, quiet=args.quiet)
    except (OSError, sqlite3.Error) as e:
        sys.exit("nfapi: cannot use %s as the data folder: %s" % (args.data, e))
    server.app = app
    on_stop_signals(lambda signum, frame: server.shutdown())
    host, port = server.server_address[:2]
    write_server_file(app.data_dir, host, port)
    print("nfapi listening on http://%s:%d (token from %s)" % (host, port, app.token_source), flush=True)
    if server.unix:
        print("nfapi also listening on %s: its owner (uid %d) needs no token there" % (server.unix.path, os.getuid()),
              flush=True)
    print(web_page_line(host, port, app), flush=True)
    try:
        server.serve_forever()
    finally:
        remove_server_file(app.data_dir)
        stop_after_requests(server, app)


def stop_after_requests(server, app):
    """Once nothing new is accepted: let the requests in progress finish (long polls end at once),
    then close the database."""
    app.stopping.set()
    app.changes.close()
    app.courier.finish()
    if server.wait_for_requests(SHUTDOWN_GRACE):
        app.db.close()
    else:
        # They would fail on a closed database; SQLite needs no close to stay consistent.
        sys.stderr.write("nfapi: stopped with %d requests still in progress\n" % server.busy)


if __name__ == "__main__":
    main()

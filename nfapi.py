#!/usr/bin/env python3
"""nfapi: run Nextflow pipelines over HTTP, with nothing but the Python standard library.

    python3 nfapi.py --config example-config.json --data ./nfapi-data --host 127.0.0.1 --port 8000

A *workflow* is a named folder of input files plus a chosen pipeline and its arguments. Clients
create workflows, upload files, choose one of the pipelines configured by the operator, fill in its
arguments and schedule a *run*. A worker (nfapi_worker.py) claims queued runs over HTTP and starts
`nextflow run`; Nextflow reports every task back through its weblog to
`POST /api/workflows/<id>/nextflow-log`.

Every request needs `Authorization: Bearer <token>`. The token comes from $NFAPI_TOKEN, else from
`<data>/api-token` (created on first start, mode 0600). Nextflow's weblog posts carry a per-run
secret instead, which works for that run only.

Data layout under --data (created 0700, files 0600):
    nfapi.sqlite3        workflows, runs and tasks (SQLite in WAL mode)
    api-token            the API token, unless $NFAPI_TOKEN is set
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
answer is described by GET /api/openapi.json. Runs on Python 3.8+ and SQLite 3.24+.
"""

import argparse
import base64
import collections
import contextlib
import email.message
import email.utils
import errno
import functools
import glob
import hmac
import http
import json
import math
import os
import posixpath
import queue
import re
import resource
import secrets
import selectors
import shutil
import signal
import socket
import socketserver
import sqlite3
import struct
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
}
MAX_NAME_LENGTH = 512
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_FORM_FIELD_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024
LINGER_SECONDS = 2.0
LOG_CHUNK_BYTES = 1024 * 1024
ARG_TYPES = ("path", "paths", "file-glob", "number", "text", "boolean", "select")
ACTIVE_RUN_STATES = ("queued", "running")
FINAL_RUN_STATES = ("succeeded", "failed", "cancelled", "lost")
MAX_CLAIM_WAIT = 30
NEXTFLOW_UNKNOWN_EXIT = 2147483647  # Integer.MAX_VALUE: a task's exit code before it is known
# Nextflow's task states by progress: a late or repeated weblog post never moves a task back.
TASK_STATUS_RANK = {"NEW": 0, "SUBMITTED": 1, "RUNNING": 2, "COMPLETED": 3, "FAILED": 3, "ABORTED": 3}
TEMP_PREFIX = ".nfapi-"


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
    known = set(DEFAULTS) | {"nextflow_workflows", "cors_origins"}
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
    known = {"directory", "script", "pipeline", "revision", "nextflow_parameters", "args", "schema", "include_hidden"}
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
        mode = self.writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            sys.exit("nfapi: SQLite refused WAL mode for %s (journal_mode=%s). The data folder is "
                     "probably on a network filesystem (NFS, GPFS, Lustre); put --data on a local disk."
                     % (path, mode))
        migrate(self)

    @contextlib.contextmanager
    def connection(self):
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


# ==== Filesystem ====

def relative_path_problem(path):
    """Why a user-supplied relative path is unacceptable before touching the disk, or None."""
    if "\x00" in path:
        return "must not contain NUL"
    if any(ord(c) < 32 for c in path):
        return "must not contain control characters"
    if "\\" in path:
        return "must not contain backslashes"
    if path.startswith("/") and path.strip("/"):
        return "must be relative to the workflow folder"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        return "must be a path in the workflow folder, not a URL"
    if ".." in path.split("/"):
        return "must not contain '..'"
    return None


def resolve(root, path, field):
    """The one resolver for user paths: `path` relative to the workflow folder `root`.

    "" and "/" name the root. Absolute paths, `..`, NUL and control characters are refused, and so
    is any path that leaves the folder through a symlink. Returns the absolute path (which may not
    exist yet).
    """
    if not isinstance(path, str):
        raise ApiError(422, field, "must be a string")
    problem = relative_path_problem(path)
    if problem:
        raise ApiError(422, field, problem)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    real_root = os.path.realpath(root)
    target = os.path.join(real_root, *parts)
    if not inside(real_root, os.path.realpath(target)):
        raise ApiError(422, field, "leaves the workflow folder")
    return target


def inside(real_root, real_path):
    return real_path == real_root or real_path.startswith(real_root + os.sep)


def check_file_name(name):
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ApiError(422, "file", "the file name must be a single name, without / or \\")
    problem = relative_path_problem(name)
    if problem:
        raise ApiError(422, "file", "the file name " + problem)


def make_private_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)


def remove_tree_atomically(path, trash):
    """Move a file or folder to the trash folder first so it vanishes in one step, then delete it."""
    doomed = os.path.join(trash, "%sdeleted-%s" % (TEMP_PREFIX, secrets.token_hex(8)))
    os.rename(path, doomed)
    delete_tree(doomed)


def delete_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


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
        at = self.buffer.find(self.delimiter)
        if at < 0:
            self.buffer = self.buffer[-len(self.delimiter):]
            return False
        self.buffer = self.buffer[at + len(self.delimiter):]
        self.state = "after_delimiter"
        return True

    def _after_delimiter(self, events):
        if len(self.buffer) < 2:
            return False
        if self.in_part:
            events.append(("end",))
            self.in_part = False
        marker, self.buffer = self.buffer[:2], self.buffer[2:]
        if marker == b"--":
            self.state = "done"
        elif marker == b"\r\n":
            self.state = "headers"
        else:
            raise ApiError(400, "body", "malformed multipart delimiter")
        return True

    def _headers(self, events):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 and self.buffer.startswith(b"\r\n"):
            end = -2
        if end == -1:
            if len(self.buffer) > MAX_PART_HEADER_BYTES:
                raise ApiError(400, "body", "multipart part headers are too large")
            return False
        if end > MAX_PART_HEADER_BYTES:
            raise ApiError(400, "body", "multipart part headers are too large")
        name, filename = parse_part_headers(self.buffer[:max(end, 0)])
        self.buffer = self.buffer[end + 4:]
        events.append(("part", name, filename))
        self.in_part = True
        self.state = "body"
        return True

    def _body(self, events):
        at = self.buffer.find(self.delimiter)
        if at < 0:
            keep = len(self.delimiter) - 1
            if len(self.buffer) > keep:
                events.append(("data", self.buffer[:-keep]))
                self.buffer = self.buffer[-keep:]
            return False
        if at:
            events.append(("data", self.buffer[:at]))
        self.buffer = self.buffer[at + len(self.delimiter):]
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
        return cls.of({"Content-Type": "application/json"}, json.dumps(value).encode())


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
               "command")
WORKFLOW_SELECT = """
    SELECT w.id, w.name, w.nextflow_workflow, w.nextflow_arguments, r.id AS run_id, %s
    FROM workflows w""" % ", ".join("r." + c for c in RUN_COLUMNS) + """
    LEFT JOIN runs r ON r.id = (SELECT max(id) FROM runs WHERE workflow_id = w.id)
"""


def run_json(row, run_id):
    """A run as clients see it; the weblog secret is cut out of the command line."""
    run = {"id": run_id}
    run.update((column, row[column]) for column in RUN_COLUMNS)
    run["resume"] = bool(run["resume"])
    run["command"] = [redact(arg) for arg in json.loads(row["command"] or "[]")]
    return run


def workflow_json(row):
    """The seed's workflow shape, plus the latest run's `status` and that run as `run`."""
    run = None if row["run_id"] is None else run_json(row, row["run_id"])
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
    }


def load_workflow(conn, workflow_id):
    row = conn.execute(WORKFLOW_SELECT + " WHERE w.id = ?", (workflow_id,)).fetchone()
    if row is None:
        raise no_workflow(workflow_id)
    return workflow_json(row)


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
            merged[name]["value"] = value
    if errors:
        raise ApiError.of(422, errors)
    return merged


# ==== Handlers ====
# Each handler takes the request (a Request) and the route's parameters and returns
# (status, body): a dict is sent as JSON, None as an empty body.

def workflows_list(req):
    """List workflows by id; `offset` and `limit` page through them."""
    offset = req.query_int("offset", 0)
    limit = req.query_int("limit", -1)
    with req.db() as conn:
        rows = conn.execute(WORKFLOW_SELECT + " ORDER BY w.id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
    return 200, {"workflows": [workflow_json(row) for row in rows]}


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
        return 200, {"workflow": load_workflow(conn, workflow_id)}


def workflow_get(req, id):
    """One workflow with its latest run."""
    with req.db() as conn:
        return 200, {"workflow": load_workflow(conn, id)}


def workflow_update(req, id):
    """Choose the pipeline and set argument values (not while a run is active)."""
    body = req.json()
    pipelines = req.app.config["pipelines"]
    given = body.get("nextflow_arguments", {})
    if not isinstance(given, dict):
        raise ApiError(422, "nextflow_arguments", "must be an object of arguments by name")
    with req.app.db.write() as conn:
        row = workflow_row(conn, id)
        refuse_if_active(conn, id, "change a workflow")
        name = body.get("nextflow_workflow", row["nextflow_workflow"])
        if not isinstance(name, str) or name not in pipelines:
            if "nextflow_workflow" in body:
                raise ApiError(422, "nextflow_workflow", "unknown pipeline (see /api/nextflow-workflows)")
            if given:
                raise ApiError(422, "nextflow_workflow", "choose a pipeline before setting its arguments")
            return 200, {}
        stored = json.loads(row["nextflow_arguments"]) if name == row["nextflow_workflow"] else {}
        merged = merge_arguments(pipelines[name]["dynamic"], stored, given)
        conn.execute("UPDATE workflows SET nextflow_workflow = ?, nextflow_arguments = ? WHERE id = ?",
                     (name, json.dumps(merged), id))
    return 200, {}


def workflow_delete(req, id):
    """Delete a workflow, its files and its runs (not while a run is active)."""
    with req.app.db.write() as conn:
        workflow_row(conn, id)
        refuse_if_active(conn, id, "delete a workflow")
        conn.execute("DELETE FROM workflows WHERE id = ?", (id,))
    for folder in (req.app.workflow_dir(id), req.app.launch_dir(id)):
        if os.path.exists(folder):
            remove_tree_atomically(folder, req.app.tmp_dir)
    return 200, {}


def workflow_files(req, id):
    """The folders and files in `dir` (default: the workflow folder), sorted."""
    root = req.app.existing_workflow_dir(id)
    folder = resolve(root, req.query_str("dir", ""), "dir")
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        raise ApiError(404, "dir", "no such folder")
    except NotADirectoryError:
        raise ApiError(422, "dir", "is a file, not a folder")
    folders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    files = sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
    return 200, {"folders": folders, "files": files}


def workflow_upload_file(req, id):
    """Stream a multipart upload into a temp file, and rename it into place once the body is complete."""
    root = req.app.existing_workflow_dir(id)
    limit = req.app.config["max_upload_bytes"]
    if limit is not None and req.body_left > limit:
        raise ApiError(413, "file", "the upload is larger than %d bytes" % limit)
    parser = MultipartParser(multipart_boundary(req.headers.get("content-type")))
    fields = {}
    temp = tempfile.NamedTemporaryFile(dir=req.app.tmp_dir, prefix=TEMP_PREFIX + "upload-", delete=False)
    try:
        with disk_full_is_507():
            filename = receive_form(req, parser, temp, fields)
        try:
            directory = fields.get("directory", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "directory", "must be UTF-8")
        folder = resolve(root, directory, "directory")
        check_file_name(filename)
        target = resolve(root, posixpath.join(directory.strip("/"), filename), "file")
        if os.path.isdir(target):
            raise ApiError(409, "file", "a folder with that name exists")
        try:
            make_private_dir(folder)
        except (FileExistsError, NotADirectoryError):
            raise ApiError(409, "directory", "a file is in the way of that folder")
        with disk_full_is_507():
            os.fsync(temp.fileno())
            temp.close()
            os.replace(temp.name, target)
    finally:
        temp.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp.name)
    return 200, {"directory": directory, "file": filename}


def receive_form(req, parser, temp, fields):
    """Feed the body to `parser`: the `file` part streams into `temp`, other fields are collected
    into `fields`. Returns the file part's file name."""
    filename, current = None, None
    for chunk in req.body_chunks():
        for event in parser.feed(chunk):
            if event[0] == "part":
                current = event[1]
                if current == "file":
                    if filename is not None or event[2] is None:
                        raise ApiError(422, "file", "expected one `file` part with a file name")
                    filename = event[2]
                else:
                    fields[current] = b""
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
    return filename


@contextlib.contextmanager
def disk_full_is_507():
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, "file", "the server's disk is full")
        raise


def workflow_path_request(req, id, action):
    root = req.app.existing_workflow_dir(id)
    target = resolve(root, req.json().get("path"), "path")
    if os.path.realpath(target) == os.path.realpath(root):
        raise ApiError(422, "path", "cannot %s the workflow folder itself" % action)
    return target


def workflow_delete_path(req, id):
    """Delete a file or a folder with everything in it."""
    target = workflow_path_request(req, id, "delete")
    if not os.path.lexists(target):
        raise ApiError(404, "path", "no such file or folder")
    remove_tree_atomically(target, req.app.tmp_dir)
    return 200, None


def workflow_create_folder(req, id):
    """Create a folder (and its parents)."""
    target = workflow_path_request(req, id, "create")
    try:
        make_private_dir(target)
    except (FileExistsError, NotADirectoryError):
        raise ApiError(409, "path", "a file is in the way")
    return 200, None


def workflow_schedule(req, id):
    """Queue a run. `{"resume": true}` relaunches with -resume on the latest run's Nextflow session."""
    resume = req.json().get("resume", False)
    if not isinstance(resume, bool):
        raise ApiError(422, "resume", "must be true or false")
    # Checked outside the transaction (it reads the disk); the insert then makes sure the
    # workflow is still what was checked.
    with req.db() as conn:
        checked, name, arguments, params, session = prepare_run(req.app, conn, id, resume)
    with req.app.db.write() as conn:
        refuse_if_active(conn, id, "schedule a workflow")
        if tuple(workflow_row(conn, id)) != tuple(checked):
            raise ApiError(409, "workflow", "the workflow changed while it was being scheduled; try again")
        conn.execute("INSERT INTO runs (workflow_id, status, pipeline, arguments, params, resume, resume_session, "
                     "secret, created_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                     (id, name, json.dumps(arguments), json.dumps(params), int(resume), session,
                      secrets.token_urlsafe(24), time.time()))
    req.app.announce_work()
    return 200, {"is_scheduled": True}


def workflow_command(req, id):
    """The exact argv and params file the worker would run if the workflow were scheduled now.

    Nothing runs. Only the run's id and weblog secret are not known yet: they show as `<run id>`
    and `<secret>`. 422 with the same errors as `schedule` when it could not be scheduled.
    """
    resume = req.query_bool("resume")
    with req.db() as conn:
        _, name, arguments, params, session = prepare_run(req.app, conn, id, resume)
    run = {"id": "<run id>", "workflow_id": id, "secret": "<secret>", "params": json.dumps(params),
           "resume_session": session}
    launch = launch_spec(req.app, run, req.app.config["pipelines"][name], weblog_host(req))
    return 200, {key: launch[key] for key in ("argv", "cwd", "params", "params_file")}


def prepare_run(app, conn, workflow_id, resume):
    """Everything a new run needs, checked: (workflow row, pipeline name, arguments, params, session).
    Raises 422 with one message per argument that is missing, invalid or not on disk."""
    row = workflow_row(conn, workflow_id)
    name = row["nextflow_workflow"]
    pipeline = app.config["pipelines"].get(name)
    if pipeline is None:
        raise ApiError(422, "nextflow_workflow", "choose a pipeline first")
    arguments = merge_arguments(pipeline["dynamic"], json.loads(row["nextflow_arguments"]), {})
    root = app.workflow_dir(workflow_id)
    errors = {arg: [problem] for arg, problem in
              ((arg, launch_problem(definition, root, arg)) for arg, definition in arguments.items()) if problem}
    if errors:
        raise ApiError.of(422, errors)
    session = resume_session(conn, workflow_id) if resume else None
    return row, name, arguments, nextflow_params(pipeline, arguments, root), session


def launch_problem(definition, root, name):
    """Why an argument cannot be launched with as it is: empty but required, invalid, or (paths and
    patterns) not what is on disk."""
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
            real_root = os.path.realpath(root)
            matches = [m for m in glob.glob(resolve(root, value, name)) if inside(real_root, os.path.realpath(m))]
            return None if matches else "matches no file in the workflow folder"
    except ApiError as e:
        return e.errors[name][0]
    return None


def disk_path_problem(definition, root, value, name):
    target = resolve(root, value, name)
    if not os.path.exists(target):
        return "%s does not exist" % value if definition.get("exists") else None
    if os.path.isdir(target) and not definition.get("selectable_folders"):
        return "%s is a folder, a file is expected" % value
    if not os.path.isdir(target) and not definition.get("selectable_files"):
        return "%s is a file, a folder is expected" % value
    return None


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
        return resolve(root, value, name)
    if kind == "paths":
        return ",".join(resolve(root, v, name) for v in value)
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
        else:
            conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (run["id"],))
        return 200, {"workflow": load_workflow(conn, id)}


def workflow_finished(req, id):
    """The worker reports how nextflow ended. Repeating the report changes nothing."""
    body = req.json()
    run_id, exit_code = body.get("run_id"), body.get("exit_code")
    if not is_int(run_id):
        raise ApiError(422, "run_id", "must be an integer")
    if exit_code is not None and not is_int(exit_code):
        raise ApiError(422, "exit_code", "must be an integer or null")
    console_error = body.get("error") if isinstance(body.get("error"), str) else None
    with req.app.db.write() as conn:
        run = conn.execute("SELECT * FROM runs WHERE id = ? AND workflow_id = ?", (run_id, id)).fetchone()
        if run is None:
            raise ApiError(404, "run_id", "no such run for this workflow")
        if run["status"] not in ("running", "lost"):
            return 200, None
        if run["cancel_requested"] or body.get("cancelled") is True:
            status = "cancelled"
        else:
            status = "succeeded" if exit_code == 0 else "failed"
        error = None
        if status != "succeeded":
            error = run["nextflow_error"] or console_error or "nextflow exited with code %s" % exit_code
        conn.execute("UPDATE runs SET status = ?, finished_at = ?, exit_code = ?, error_message = ?, lease_until = NULL "
                     "WHERE id = ? AND status IN ('running', 'lost')", (status, time.time(), exit_code, error, run_id))
    return 200, None


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def run_secret_auth(handler):
    """Mark a route that authenticates with a run's weblog secret instead of the API token."""
    handler.run_secret_auth = True
    return handler


@run_secret_auth
def workflow_nextflow_log(req, id):
    """Nextflow's weblog (one POST per event, sequential, waiting for each answer): record and answer fast.

    The URL carries `?run=<run id>&token=<secret>`; HTTP Basic `<any user>:<secret>` (weblog.basicToken)
    works too. Counting is idempotent: tasks are rows keyed by (run, task_id).
    """
    run_id, secret, message = req.query_int("run", None), req.weblog_secret(), req.json()

    def record(conn):
        # Checked in the write transaction: the writing connection has the run's page cached,
        # and the run cannot be deleted between the check and the write.
        row = None if run_id is None else conn.execute(
            "SELECT secret FROM runs WHERE id = ? AND workflow_id = ?", (run_id, id)).fetchone()
        if row is None or not hmac.compare_digest(secret.encode(), row["secret"].encode()):
            return False
        record_weblog(conn, run_id, message)
        return True
    if not req.app.db.write_together(record):
        raise ApiError(401, "token", "missing or wrong run secret", {"WWW-Authenticate": 'Basic realm="nfapi run"'})
    return 200, None


def record_weblog(conn, run_id, message):
    event = message.get("event") or message.get("runStatus")
    trace = message.get("trace")
    if isinstance(trace, dict):
        record_task(conn, run_id, trace)
    if event == "started":
        conn.execute("UPDATE runs SET nextflow_run_name = ?, session_id = ? WHERE id = ?",
                     (text_or_none(message.get("runName")), text_or_none(message.get("runId")), run_id))
    elif event == "completed":
        metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
        workflow = metadata.get("workflow") if isinstance(metadata.get("workflow"), dict) else {}
        stats = workflow.get("stats") if isinstance(workflow.get("stats"), dict) else {}
        success = workflow.get("success")
        conn.execute("UPDATE runs SET nextflow_success = ?, nextflow_error = ?, cached = ? WHERE id = ?",
                     (int(success) if isinstance(success, bool) else None, text_or_none(workflow.get("errorMessage")),
                      stats.get("cachedCount") if is_int(stats.get("cachedCount")) else None, run_id))


def record_task(conn, run_id, trace):
    """Upsert one task. Its status only moves forward (a late RUNNING never undoes COMPLETED, and a
    final status never changes), so a repeated or reordered post counts once; triggers keep the
    run's counters."""
    task_id, status = trace.get("task_id"), trace.get("status")
    if not is_int(task_id) or status not in TASK_STATUS_RANK:
        return
    exit_code = trace.get("exit")
    conn.execute(UPSERT_TASK, (
        run_id, task_id, text_or_none(trace.get("name")), text_or_none(trace.get("process")),
        text_or_none(trace.get("tag")), status,
        exit_code if is_int(exit_code) and exit_code != NEXTFLOW_UNKNOWN_EXIT else None,
        epoch_ms(trace.get("submit")), epoch_ms(trace.get("start")), epoch_ms(trace.get("complete")),
        trace.get("attempt") if is_int(trace.get("attempt")) else None, text_or_none(trace.get("workdir"))))


def status_rank_sql(column):
    return "CASE %s %s END" % (column, " ".join("WHEN '%s' THEN %d" % item for item in TASK_STATUS_RANK.items()))


UPSERT_TASK = """
    INSERT INTO tasks (run_id, task_id, name, process, tag, status, exit, submit, start, complete, attempt, workdir)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (run_id, task_id) DO UPDATE SET
        name = excluded.name, process = excluded.process, tag = excluded.tag, status = excluded.status,
        exit = excluded.exit, submit = excluded.submit, start = excluded.start, complete = excluded.complete,
        attempt = excluded.attempt, workdir = excluded.workdir
    WHERE excluded.status = tasks.status OR (%(old)s < 3 AND %(new)s >= %(old)s)
""" % {"old": status_rank_sql("tasks.status"), "new": status_rank_sql("excluded.status")}


def text_or_none(value):
    return value if isinstance(value, str) else None


def epoch_ms(value):
    return value if is_int(value) and value > 0 else None


# ==== Worker protocol ====

def worker_claim(req):
    """Long-poll for a queued run: answer `{"run": launch}` at once when there is one, else wait up
    to `wait` seconds for one to be scheduled, then answer `{"run": null}`."""
    body = req.json()
    worker = body.get("worker")
    if not isinstance(worker, str) or not 1 <= len(worker) <= 200:
        raise ApiError(422, "worker", "must be a string of 1 to 200 characters")
    wait = body.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_CLAIM_WAIT:
        raise ApiError(422, "wait", "must be a number of seconds from 0 to %d" % MAX_CLAIM_WAIT)
    host = weblog_host(req)
    deadline = time.monotonic() + wait
    while True:
        generation = req.app.work_generation
        launch = claim_next_run(req.app, worker, host)
        remaining = deadline - time.monotonic()
        if launch or remaining <= 0:
            return 200, {"run": launch}
        req.app.wait_for_work(generation, remaining)


def weblog_host(req):
    """Nextflow runs beside the worker, so it reaches the server the way the worker did: its Host."""
    host = req.headers.get("host", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
        raise ApiError(400, "Host", "a Host header is needed to build the weblog URL")
    return host


def claim_next_run(app, worker, host):
    """Atomically move the oldest queued run to running for `worker` and return its launch spec."""
    now = time.time()
    with app.db.write() as conn:
        while True:
            run = conn.execute("SELECT * FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if run is None:
                return None
            pipeline = app.config["pipelines"].get(run["pipeline"])
            if pipeline is None:
                conn.execute("UPDATE runs SET status = 'failed', finished_at = ?, error_message = ? WHERE id = ?",
                             (now, "the pipeline %r is no longer configured" % run["pipeline"], run["id"]))
                continue
            launch = launch_spec(app, run, pipeline, host)
            claimed = conn.execute(
                "UPDATE runs SET status = 'running', worker = ?, started_at = ?, lease_until = ?, command = ? "
                "WHERE id = ? AND status = 'queued'",
                (worker, now, now + app.config["lease_seconds"], json.dumps(launch["argv"]), run["id"])).rowcount
            if claimed == 1:
                return launch


def launch_spec(app, run, pipeline, host):
    """Everything a worker needs to start nextflow; user values are only in `params`, never in argv."""
    workflow_id, run_id = run["workflow_id"], run["id"]
    run_dir = app.run_dir(run_id)
    params_file = os.path.join(run_dir, "params.json")
    weblog = "http://%s/api/workflows/%d/nextflow-log?run=%s&token=%s" % (host, workflow_id, run_id, run["secret"])
    launch_dir = app.launch_dir(workflow_id)
    argv = ["run", pipeline.get("script") or pipeline.get("pipeline")]
    if "revision" in pipeline:
        argv += ["-r", pipeline["revision"]]
    argv += ["-params-file", params_file, "-with-weblog", weblog, "-name", "nfapi-run-%s" % run_id,
             "-work-dir", os.path.join(launch_dir, "work"), "-ansi-log", "false"]
    argv += pipeline["nextflow_parameters"]
    if run["resume_session"]:
        argv += ["-resume", run["resume_session"]]
    return {"run_id": run_id, "workflow_id": workflow_id, "argv": argv, "cwd": launch_dir,
            "params": json.loads(run["params"]), "params_file": params_file, "run_dir": run_dir,
            "console_log": os.path.join(run_dir, "console.log"), "lease_seconds": app.config["lease_seconds"]}


def worker_release(req):
    """A worker that claimed a run while stopping gives it back to the queue."""
    body = req.json()
    if not is_int(body.get("run_id")) or not isinstance(body.get("worker"), str):
        raise ApiError(422, "run_id", "give the worker and the run_id it claimed")
    with req.app.db.write() as conn:
        released = conn.execute("UPDATE runs SET status = 'queued', worker = NULL, started_at = NULL, lease_until = NULL, "
                                "command = NULL WHERE id = ? AND worker = ? AND status = 'running'",
                                (body["run_id"], body["worker"])).rowcount
    if not released:
        raise ApiError(409, "run_id", "this worker is not running that run")
    req.app.announce_work()
    return 200, {}


def worker_heartbeat(req):
    """Extend the lease of a worker's runs; answer which to cancel and which the server gave up on."""
    body = req.json()
    worker, run_ids = body.get("worker"), body.get("runs")
    if not isinstance(worker, str):
        raise ApiError(422, "worker", "must be a string")
    if not isinstance(run_ids, list) or len(run_ids) > 1000 or not all(is_int(r) for r in run_ids):
        raise ApiError(422, "runs", "must be a list of run ids")
    if not run_ids:
        return 200, {"cancel": [], "gone": []}
    marks = ",".join("?" * len(run_ids))
    with req.app.db.write() as conn:
        conn.execute("UPDATE runs SET lease_until = ? WHERE status = 'running' AND worker = ? AND id IN (%s)" % marks,
                     [time.time() + req.app.config["lease_seconds"], worker] + run_ids)
        rows = conn.execute("SELECT id, status, worker, cancel_requested FROM runs WHERE id IN (%s)" % marks,
                            run_ids).fetchall()
    running = {r["id"]: r for r in rows if r["status"] == "running" and r["worker"] == worker}
    return 200, {"cancel": [i for i, r in running.items() if r["cancel_requested"]],
                 "gone": [i for i in run_ids if i not in running]}


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
    return 200, {"runs": [run_json(row, row["id"]) for row in rows]}


def workflow_run(req, id, run_id):
    """One run of the workflow."""
    with req.db() as conn:
        return 200, {"run": run_json(run_row(conn, id, run_id), run_id)}


def workflow_run_tasks(req, id, run_id):
    """The run's tasks as reported by Nextflow's weblog, by task id; `?status=FAILED` filters."""
    status = req.query_str("status", None)
    if status is not None and status not in TASK_STATUS_RANK:
        raise ApiError(422, "status", "must be one of %s" % ", ".join(TASK_STATUS_RANK))
    offset, limit = req.query_int("offset", 0), req.query_int("limit", -1)
    with req.db() as conn:
        run_row(conn, id, run_id)
        rows = conn.execute("SELECT * FROM tasks WHERE run_id = ? AND (? IS NULL OR status = ?) "
                            "ORDER BY task_id LIMIT ? OFFSET ?", (run_id, status, status, limit, offset)).fetchall()
    return 200, {"tasks": [task_json(row) for row in rows]}


def task_json(row):
    task = {key: row[key] for key in ("task_id", "name", "process", "tag", "status", "exit", "attempt", "submit",
                                      "start", "complete", "workdir")}
    task["duration"] = row["complete"] - row["submit"] if row["complete"] and row["submit"] else None
    return task


def workflow_log(req, id):
    """A run's console output (or `file=nextflow`: its .nextflow.log) as text from byte `offset`.

    `X-Next-Offset` says where to continue and `X-Run-Status` whether more may come, so a client
    can follow a live run: ask again from X-Next-Offset until the status is final.
    """
    which = req.query_str("file", "console")
    if which not in ("console", "nextflow"):
        raise ApiError(422, "file", "must be console or nextflow")
    offset = req.query_int("offset", 0)
    with req.db() as conn:
        run = run_row(conn, id, req.query_int("run", None))
    path = run_log_path(req.app, run, which)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                raise ApiError(416, "offset", "the log has only %d bytes" % size)
            f.seek(offset)
            data = f.read(LOG_CHUNK_BYTES)
    except FileNotFoundError:
        if offset:
            raise ApiError(416, "offset", "the log is empty")
        data, size = b"", 0
    return 200, Body.of({"Content-Type": "text/plain; charset=utf-8", "X-Next-Offset": str(offset + len(data)),
                         "X-Log-Size": str(size), "X-Run-Status": run["status"], "X-Run-Id": str(run["id"])}, data)


def run_log_path(app, run, which):
    if which == "console":
        return os.path.join(app.run_dir(run["id"]), "console.log")
    # The worker keeps each run's .nextflow.log in the run folder when nextflow ends; until then
    # the live one is in the launch folder.
    kept = os.path.join(app.run_dir(run["id"]), "nextflow.log")
    if run["status"] != "running" or os.path.exists(kept):
        return kept
    return os.path.join(app.launch_dir(run["workflow_id"]), ".nextflow.log")


def workflow_download(req, id):
    """A file (zero-copy with sendfile, single Range requests, ETag) or a folder as a streamed archive."""
    root = req.app.existing_workflow_dir(id)
    target = resolve(root, req.query_str("path", ""), "path")
    if os.path.isdir(target):
        return folder_archive(req, root, target, req.query_str("format", "zip"))
    try:
        f = open(target, "rb")
    except FileNotFoundError:
        raise ApiError(404, "path", "no such file or folder")
    try:
        return file_download(req, f, os.path.basename(target))
    except BaseException:
        f.close()
        raise


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


def folder_archive(req, root, folder, fmt):
    """Stream a folder as zip or tar.gz while walking it: nothing is built in memory or on disk.
    Symlinks are left out, so nothing outside the workflow folder can end up in the archive."""
    if fmt not in ("zip", "tar.gz"):
        raise ApiError(422, "format", "must be zip or tar.gz")
    base = os.path.basename(folder) if os.path.realpath(folder) != os.path.realpath(root) else "workflow-%s" % os.path.basename(root)
    headers = {"Content-Type": "application/zip" if fmt == "zip" else "application/gzip",
               "Content-Disposition": attachment("%s.%s" % (base, fmt))}

    def send(handler):
        out = ChunkedWriter(handler.wfile)
        if fmt == "zip":
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for path, name in archive_entries(folder, base):
                    archive.write(path, name)
        else:
            with tarfile.open(fileobj=out, mode="w|gz") as archive:
                for path, name in archive_entries(folder, base):
                    archive.add(path, name, recursive=False)
        out.close()
    return 200, Body(headers, None, send)


def archive_entries(folder, base):
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(parent, d)))
        relative = os.path.relpath(parent, folder)
        prefix = base if relative == "." else posixpath.join(base, relative)
        yield parent, prefix + "/"
        for name in sorted(files):
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                yield path, posixpath.join(prefix, name)


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
    ("GET", "/api/workflows/<int:id>/log", workflow_log),
    ("GET", "/api/workflows/<int:id>/download", workflow_download),
    ("GET", "/api/nextflow-workflows", pipelines_list),
    ("GET", "/api/nextflow-workflows/<name>/arguments", pipeline_arguments),
    ("POST", "/api/worker/claim", worker_claim),
    ("POST", "/api/worker/heartbeat", worker_heartbeat),
    ("POST", "/api/worker/release", worker_release),
    ("GET", "/api/openapi.json", openapi_json),
]


def compile_route(pattern):
    def group(m):
        return "(?P<%s>%s)" % (m.group(2), "[0-9]{1,18}" if m.group(1) else "[^/]+")
    return re.compile(re.sub(r"<(int:)?(\w+)>", group, pattern) + r"\Z")


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
RUN_STATES = list(ACTIVE_RUN_STATES + FINAL_RUN_STATES)

SCHEMAS = {
    "Errors": obj(["errors"], errors={"type": "object", "additionalProperties": array(STR)}),
    "Argument": obj(["type", "desc", "value"], type={"enum": list(ARG_TYPES)}, desc=STR, value={}, required=BOOL,
                    help_text=STR, group=STR, hidden=BOOL, selectable_files=BOOL, selectable_folders=BOOL,
                    exists=BOOL, pattern=STR, integer=BOOL, minimum=NUM, maximum=NUM, is_multiline=BOOL,
                    min_length=INT, max_length=INT, options=array({})),
    "Run": obj(RUN_COLUMNS + ("id",), id=INT, status={"enum": RUN_STATES}, pipeline=STR, created_at=NUM,
               started_at=nullable(NUM), finished_at=nullable(NUM), exit_code=nullable(INT),
               error_message=nullable(STR), submitted=INT, completed=INT, failed=INT, cached=nullable(INT),
               resume=BOOL, nextflow_run_name=nullable(STR), session_id=nullable(STR), worker=nullable(STR),
               command=array(STR)),
    "Workflow": obj(["id", "name", "nextflow_arguments", "nextflow_workflow", "submitted_processes",
                     "completed_processes", "is_scheduled", "status", "run"],
                    id=INT, name=STR, nextflow_arguments={"type": "object", "additionalProperties": ref("Argument")},
                    nextflow_workflow=STR, submitted_processes=INT, completed_processes=INT, is_scheduled=BOOL,
                    status=nullable({"enum": RUN_STATES}), run=nullable(ref("Run"))),
    "Task": obj(["task_id", "name", "process", "tag", "status", "exit", "attempt", "submit", "start", "complete",
                 "duration", "workdir"], task_id=INT, name=nullable(STR), process=nullable(STR), tag=nullable(STR),
                status={"enum": list(TASK_STATUS_RANK)}, exit=nullable(INT), attempt=nullable(INT),
                submit=nullable(INT), start=nullable(INT), complete=nullable(INT), duration=nullable(INT),
                workdir=nullable(STR)),
    "Launch": obj(["run_id", "workflow_id", "argv", "cwd", "params", "params_file", "run_dir", "console_log",
                   "lease_seconds"], run_id=INT, workflow_id=INT, argv=array(STR), cwd=STR, params={"type": "object"},
                  params_file=STR, run_dir=STR, console_log=STR, lease_seconds=NUM),
}

QUERY = {
    "offset": ID, "limit": ID, "dir": STR, "path": STR, "run": ID,
    "token": STR, "status": {"enum": list(TASK_STATUS_RANK)}, "file": {"enum": ["console", "nextflow"]},
    "format": {"enum": ["zip", "tar.gz"]}, "resume": {"enum": ["true", "false"]},
}
PATH_ARGS = {"id": ID, "run_id": ID, "name": STR}
WORKER = dict(STR, minLength=1, maxLength=200)
TEXT, BINARY, NO_CONTENT = "text", "binary", "empty"

DOCS = {
    workflows_list: (["offset", "limit"], None, obj(["workflows"], workflows=array(ref("Workflow")))),
    workflows_count: ([], None, obj(["count"], count=INT)),
    workflow_create: ([], obj(["name"], name=dict(STR, minLength=1, maxLength=MAX_NAME_LENGTH)),
                      obj(["workflow"], workflow=ref("Workflow"))),
    workflow_get: ([], None, obj(["workflow"], workflow=ref("Workflow"))),
    workflow_update: ([], obj(nextflow_workflow=STR, nextflow_arguments={"type": "object"}), EMPTY_OBJECT),
    workflow_delete: ([], None, EMPTY_OBJECT),
    workflow_files: (["dir"], None, obj(["folders", "files"], folders=array(STR), files=array(STR))),
    workflow_upload_file: ([], "multipart", obj(["directory", "file"], directory=STR, file=STR)),
    workflow_delete_path: ([], obj(["path"], path=STR), NO_CONTENT),
    workflow_create_folder: ([], obj(["path"], path=STR), NO_CONTENT),
    workflow_schedule: ([], obj(resume=BOOL), obj(["is_scheduled"], is_scheduled=BOOL)),
    workflow_cancel: ([], None, obj(["workflow"], workflow=ref("Workflow"))),
    workflow_command: (["resume"], None, obj(["argv", "cwd", "params", "params_file"], argv=array(STR), cwd=STR,
                                              params={"type": "object"}, params_file=STR)),
    workflow_finished: ([], obj(["run_id"], run_id=INT, exit_code=nullable(INT), error=nullable(STR),
                                cancelled=BOOL, worker=STR), NO_CONTENT),
    workflow_nextflow_log: (["run", "token"], {"type": "object"}, NO_CONTENT),
    workflow_runs: (["offset", "limit"], None, obj(["runs"], runs=array(ref("Run")))),
    workflow_run: ([], None, obj(["run"], run=ref("Run"))),
    workflow_run_tasks: (["status", "offset", "limit"], None, obj(["tasks"], tasks=array(ref("Task")))),
    workflow_log: (["run", "offset", "file"], None, TEXT),
    workflow_download: (["path", "format"], None, BINARY),
    pipelines_list: ([], None, obj(["nextflow_workflows"], nextflow_workflows=array(STR))),
    pipeline_arguments: ([], None, obj(["arguments"], arguments={"type": "object", "additionalProperties": ref("Argument")})),
    worker_claim: ([], obj(["worker"], worker=WORKER, wait=dict(NUM, minimum=0, maximum=MAX_CLAIM_WAIT)),
                   obj(["run"], run=nullable(ref("Launch")))),
    worker_heartbeat: ([], obj(["worker", "runs"], worker=STR, runs=dict(array(INT), maxItems=1000)),
                       obj(["cancel", "gone"], cancel=array(INT), gone=array(INT))),
    worker_release: ([], obj(["worker", "run_id"], worker=STR, run_id=INT), EMPTY_OBJECT),
    openapi_json: ([], None, {"type": "object"}),
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
            "apiToken": {"type": "http", "scheme": "bearer"},
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
    elif request is not None:
        operation["requestBody"] = {"required": bool(request.get("required")),
                                    "content": {"application/json": {"schema": request}}}
    if answer == NO_CONTENT:
        operation["responses"]["200"] = {"description": "done (empty body)"}
    elif answer == TEXT:
        operation["responses"]["200"] = {"description": "text from `offset`", "content": {"text/plain": {"schema": STR}}}
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
    return operation


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
    """A request line or path with its weblog secret cut out, for logs."""
    return re.sub(r"([?&]token=)[^&\s]*", r"\1...", text)


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
        self.prepared = False

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
        if not getattr(self.route[0], "run_secret_auth", False):
            self.authenticate()

    def authenticate(self):
        """The API token allows everything; the optional read-only token allows GET."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        if hmac.compare_digest(token, self.app.token.encode()):
            return
        if self.app.read_token and hmac.compare_digest(token, self.app.read_token.encode()):
            if self.command == "GET":
                return
            raise ApiError(403, "token", "this token is read-only")
        raise ApiError(401, "token", "missing or wrong API token (Authorization: Bearer <token>)",
                       {"WWW-Authenticate": 'Bearer realm="nfapi"'})

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
        while self.body_left:
            chunk = self.conn.receive(min(READ_CHUNK, self.body_left), deadline)
            self.body_left -= len(chunk)
            yield chunk

    def json(self):
        """The body as a JSON object (an empty body is `{}`); 413 over max_json_bytes."""
        if self.json_body is None:
            if self.body_left > self.app.config["max_json_bytes"]:
                raise ApiError(413, "body", "JSON bodies are limited to %d bytes" % self.app.config["max_json_bytes"])
            data = b"".join(self.body_chunks())
            self.json_body = parse_json(data) if data.strip() else {}
            if not isinstance(self.json_body, dict):
                raise ApiError(422, "body", "must be a JSON object")
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
        self.answer_started = False
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
            status, body = handler(req, **params)
            self.send_answer(req, status, body)
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
        fields = dict(body.headers)
        fields.update(headers or {})
        fields.update(self.cors_headers(req))
        fields["X-Content-Type-Options"] = "nosniff"
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
        if req.command == "HEAD":
            self.wfile.write(head)
        elif body.data is not None:
            self.wfile.write(head + body.data)  # one write, one packet for a small answer
        else:
            self.wfile.write(head)
            body.write_to(self)

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
    """Everything the handlers share: configuration, token, database and folders."""

    def __init__(self, config, data_dir, quiet=False):
        self.config = config
        self.quiet = quiet
        self.data_dir = os.path.abspath(data_dir)
        make_private_dir(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        for sub in ("workflows", "launch", "runs", "tmp"):
            make_private_dir(os.path.join(self.data_dir, sub))
        self.tmp_dir = os.path.join(self.data_dir, "tmp")
        self.token, self.token_source = load_token(self.data_dir)
        self.read_token = load_read_token(self.data_dir)
        self.db = Database(os.path.join(self.data_dir, "nfapi.sqlite3"))
        self.work_ready = threading.Condition()
        self.work_generation = 0
        self.stopping = threading.Event()
        self.refusals = Refusals()
        self.reconcile()
        threading.Thread(target=self.reap_forever, name="lease-reaper", daemon=True).start()

    def workflow_dir(self, workflow_id):
        return os.path.join(self.data_dir, "workflows", str(workflow_id))

    def launch_dir(self, workflow_id):
        return os.path.join(self.data_dir, "launch", str(workflow_id))

    def run_dir(self, run_id):
        return os.path.join(self.data_dir, "runs", str(run_id))

    def announce_work(self):
        with self.work_ready:
            self.work_generation += 1
            self.work_ready.notify_all()

    def wait_for_work(self, generation, timeout):
        """Wait for announce_work; a stopping server ends the wait at once, so that a worker's
        long poll does not hold up the stop."""
        with self.work_ready:
            if self.work_generation == generation and not self.stopping.is_set():
                self.work_ready.wait(timeout)
        if self.stopping.is_set():
            raise ApiError(503, "general", "the server is stopping; try again")

    def reap_lost_runs(self):
        """Runs whose worker stopped sending heartbeats are `lost`, with the reason recorded.

        Not while the server itself turned connections away within the last lease (a 503, or the
        waiting room closing connections): the missing heartbeats may be ones it refused. Leases
        are judged again one lease after the last refusal, when live workers have got through.
        """
        now = time.time()
        if now - self.refusals.last < self.config["lease_seconds"]:
            return
        with self.db.write() as conn:
            conn.execute("UPDATE runs SET status = 'lost', finished_at = ?, error_message = ? "
                         "WHERE status = 'running' AND lease_until < ?",
                         (now, "the worker stopped sending heartbeats", now))

    def reap_forever(self):
        interval = min(5.0, self.config["lease_seconds"] / 4)
        while not self.stopping.wait(interval):
            try:
                self.reap_lost_runs()
            except sqlite3.Error:
                traceback.print_exc()

    def existing_workflow_dir(self, workflow_id):
        with self.db.connection() as conn:
            workflow_row(conn, workflow_id)
        root = self.workflow_dir(workflow_id)
        make_private_dir(root)
        return root

    def reconcile(self):
        """Clean up after a killed server: temp files, and folders of workflows that were deleted."""
        for name in os.listdir(self.tmp_dir):
            delete_tree(os.path.join(self.tmp_dir, name))
        with self.db.write() as conn:
            known = {str(row[0]) for row in conn.execute("SELECT id FROM workflows")}
            # Workers keep running while the server is down: give them a full lease to report back.
            conn.execute("UPDATE runs SET lease_until = ? WHERE status = 'running'",
                         (time.time() + self.config["lease_seconds"],))
        for sub in ("workflows", "launch"):
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
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        sys.exit("nfapi: configuration error in %s: %s" % (args.config, e))
    os.umask(0o077)
    raise_descriptor_limit()
    app = App(config, args.data, quiet=args.quiet)
    server = Server((args.host, args.port), app)
    # Explicit for SIGINT too: a shell starts background jobs (as `make run` does) with SIGINT ignored.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.shutdown())
    host, port = server.server_address[:2]
    print("nfapi listening on http://%s:%d (token from %s)" % (host, port, app.token_source), flush=True)
    try:
        server.serve_forever()
    finally:
        stop_after_requests(server, app)


def stop_after_requests(server, app):
    """Once nothing new is accepted: let the requests in progress finish, then close the database."""
    app.stopping.set()
    app.announce_work()
    if server.wait_for_requests(SHUTDOWN_GRACE):
        app.db.close()
    else:
        # They would fail on a closed database; SQLite needs no close to stay consistent.
        sys.stderr.write("nfapi: stopped with %d requests still in progress\n" % server.busy)


if __name__ == "__main__":
    main()

"""Issue 16, a private run config: each run's weblog secret reaches nextflow only in <run dir>/nfapi.config
(0600, passed with -c) as weblog.basicToken, never on a command line, in a URL or in a log; its values
are Groovy literals that no data folder path can break. Nextflow before 23.10 (no basicToken) gets the
secret in the config's weblog URL. And the stand-in reads such configs the way Nextflow does."""

import base64
import json
import os
import sqlite3
import stat
import subprocess

import pytest

import fake_nextflow
import nfapi
from conftest import (FAKE_NEXTFLOW, PYTHON, PostReceiver, ServerProcess, WorkerProcess, processes_with_marker,
                      ready_workflow, wait_final, wait_for, write_config)

TRACE_FIELDS = ("task_id,hash,native_id,process,tag,name,status,exit,attempt,submit,start,complete,duration,realtime,"
                "%cpu,%mem,peak_rss,peak_vmem,rchar,wchar,read_bytes,write_bytes,cpus,memory,time,disk,queue,"
                "container,hostname,error_action,workdir").split(",")


def run_secret(data, run_id):
    with sqlite3.connect(os.path.join(data, "nfapi.sqlite3"), timeout=30) as db:
        return db.execute("SELECT secret FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def recorded(worker, run_id):
    """What the stand-in recorded when it started for the run (its argv, pid, the config it read)."""
    def record():
        try:
            return worker.records().get("nfapi-run-%d" % run_id)
        except ValueError:  # being written
            return None
    return wait_for(record, timeout=20, message="nextflow to start for run %d" % run_id)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def started_run(api, wid):
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    return wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["run"], message="the run")["id"]


def leaks(secret, places):
    return [name for name, data in places if secret.encode() in data]


# ==== The secret is nowhere but in the config ====

def test_the_weblog_secret_is_on_no_command_line_url_log_or_answer(stand):
    worker = stand.worker(env={"FAKE_NF_TASK_SECONDS": "1.5"})
    api = stand.client()
    wid = ready_workflow(api)
    run_id = started_run(api, wid)
    record = recorded(worker, run_id)
    secret = run_secret(stand.data, run_id)
    places = [("cmdline", read("/proc/%d/cmdline" % record["pid"])), ("argv", json.dumps(record["argv"]).encode()),
              ("/command", api.get("/api/workflows/%d/command" % wid).body)]
    wf = wait_final(api, wid)
    # Every post was taken although the weblog URL holds no secret: the stand-in sent weblog.basicToken.
    assert wf["status"] == "succeeded" and (wf["submitted_processes"], wf["completed_processes"]) == (2, 2)
    run_dir = os.path.join(stand.data, "runs", str(run_id))
    launch = os.path.join(stand.data, "launch", str(wid))
    places += [(name, read(path)) for name, path in (
        (".nextflow.log", os.path.join(launch, ".nextflow.log")),
        ("history", os.path.join(launch, ".nextflow", "history")),
        ("kept nextflow.log", os.path.join(run_dir, "nextflow.log")),
        ("console.log", os.path.join(run_dir, "console.log")))]
    places += [("run JSON", api.get("/api/workflows/%d/runs" % wid).body)]
    assert leaks(secret, places) == []
    config_file = os.path.join(run_dir, "nfapi.config")
    assert stat.S_IMODE(os.stat(config_file).st_mode) == 0o600
    assert ("basicToken = 'nfapi:%s'" % secret).encode() in read(config_file)
    assert record["config"]["weblog"] == {"enabled": True, "basicToken": "nfapi:" + secret,
                                          "url": "http://127.0.0.1:%d/api/workflows/%d/nextflow-log?run=%d" % (
                                              stand.port, wid, run_id)}
    assert wf["run"]["command"][-2:] == ["-c", config_file]
    assert "(nextflow 24.10.0)" in worker.output()  # read once, at start
    # Nextflow's own reports are asked for, in the run folder.
    for name in ("trace.txt", "report.html", "timeline.html"):
        assert os.path.isfile(os.path.join(run_dir, name)), name


def test_the_command_preview_shows_the_config_with_the_secret_hidden(stand):
    api = stand.client()
    wid = ready_workflow(api)
    preview = api.get("/api/workflows/%d/command" % wid).json()
    run_dir = os.path.join(stand.data, "runs", "<run id>")
    assert preview["argv"][-2:] == ["-c", os.path.join(run_dir, "nfapi.config")]
    assert "-with-weblog" not in preview["argv"]
    config = fake_nextflow.parse_config_text(preview["config"], "nfapi.config")
    assert config["weblog"]["basicToken"] == "nfapi:<secret>" and "token=" not in config["weblog"]["url"]
    assert config["trace"] == {"enabled": True, "file": os.path.join(run_dir, "trace.txt"), "overwrite": True,
                               "raw": True, "fields": ",".join(TRACE_FIELDS)}
    assert config["report"] == {"enabled": True, "file": os.path.join(run_dir, "report.html"), "overwrite": True}
    assert config["timeline"] == {"enabled": True, "file": os.path.join(run_dir, "timeline.html"), "overwrite": True}


def test_nextflow_before_23_10_gets_the_secret_in_its_config_url(stand):
    """No weblog.basicToken before nf-weblog 1.1.0 (Nextflow 23.10): the worker sees the version and
    writes the URL with the secret in its query, still only in the config file."""
    worker = stand.worker(env={"NXF_VER": "23.04.0"})
    api = stand.client()
    wid = ready_workflow(api)
    run_id = started_run(api, wid)
    record = recorded(worker, run_id)
    wf = wait_final(api, wid)
    assert wf["status"] == "succeeded" and (wf["submitted_processes"], wf["completed_processes"]) == (2, 2)
    secret = run_secret(stand.data, run_id)
    assert record["config"]["weblog"] == {"enabled": True, "url": "http://127.0.0.1:%d/api/workflows/%d/nextflow-log"
                                          "?run=%d&token=%s" % (stand.port, wid, run_id, secret)}
    assert leaks(secret, [("argv", json.dumps(record["argv"]).encode())]) == []
    assert "(nextflow 23.04.0)" in worker.output()


# ==== Groovy literals ====

NASTY = ["it's", "back\\slash", "$HOME ${x} \\$y", "'''", "\\u0027", "line\nbreak\r\n", "tab\tbell\x07nul\x00",
         "\b\f\x1b\x7f", "caf\u00e9 \u20ac \U0001F600", "\u2028\u2029", "\\", "'", "", "//not a comment", "}"]


def test_groovy_string_literals_keep_every_value_as_it_is():
    parsed = fake_nextflow.parse_config_text("".join("s%d { v = %s }\n" % (i, nfapi.groovy_string(text))
                                                     for i, text in enumerate(NASTY)), "x.config")
    assert [parsed["s%d" % i]["v"] for i in range(len(NASTY))] == NASTY
    config = nfapi.run_config("/d/'$x'\\\n", "http://h/api/workflows/1/nextflow-log?run=1", "s'ecret", True)
    assert config.isascii()
    assert fake_nextflow.parse_config_text(config, "x")["trace"]["file"] == "/d/'$x'\\\n/trace.txt"


@pytest.mark.parametrize("text", ["s { v = 'a\nb' }", "s { v = 'a\\qb' }", "s { v = 'open }", "s { v = 'a'' }",
                                  "s { v = 'a'", "s v = 'a' }", "s { v = '\\u00g1' }"])
def test_the_stand_in_refuses_what_groovy_cannot_parse(text):
    with pytest.raises(fake_nextflow.Abort):
        fake_nextflow.parse_config_text(text, "x.config")


def test_a_data_folder_path_with_quotes_backslashes_dollars_and_newlines(tmp_path):
    data = str(tmp_path / "it's a \\ and $HOME ${x}\n'}") + "\\"
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, lease_seconds=2))
    srv.data = data
    srv.start()
    worker = None
    try:
        worker = WorkerProcess(srv, tmp_path).start()
        api = srv.client()
        wid = ready_workflow(api)
        run_id = started_run(api, wid)
        wf = wait_final(api, wid)
        assert wf["status"] == "succeeded", wf
        assert (wf["submitted_processes"], wf["completed_processes"]) == (2, 2)
        run_dir = os.path.join(data, "runs", str(run_id))
        config = recorded(worker, run_id)["config"]
        for scope, name in (("trace", "trace.txt"), ("report", "report.html"), ("timeline", "timeline.html")):
            assert config[scope]["file"] == os.path.join(run_dir, name) and os.path.isfile(config[scope]["file"])
    finally:
        if worker:
            worker.stop()
            wait_for(lambda: not processes_with_marker(worker.marker), timeout=15, message="worker's processes to exit")
        srv.stop()
    assert "Traceback" not in srv.output()


# ==== The stand-in speaks the config as Nextflow does ====

class Receiver(PostReceiver):
    """A weblog receiver on loopback that keeps each post: (path, headers, JSON body)."""

    def __init__(self):
        self.posts = []
        super().__init__()
        self.url = "http://127.0.0.1:%d" % self.port

    def answer(self, path, headers, body):
        self.posts.append((path, dict(headers), json.loads(body)))
        return 200


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def stand_in(tmp_path, config, *args, env=None, processes=("A", "B"), name="cfg-run"):
    script = tmp_path / "main.nf"
    script.write_text("".join("process %s {\n}\n" % p for p in processes))
    (tmp_path / "nfapi.config").write_text(config)
    return subprocess.run([PYTHON, FAKE_NEXTFLOW, "run", str(script), "-c", str(tmp_path / "nfapi.config"),
                           "-name", name, "-ansi-log", "false"] + list(args),
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                          env=dict(dict(os.environ, FAKE_NF_TASK_SECONDS="0.05"), **(env or {})))


def test_the_stand_in_posts_with_basic_auth_from_the_config(tmp_path, receiver):
    config = ("// nfapi\nweblog {\n    enabled = true\n    url = '%s/log?run=7'\n    basicToken = 'nfapi:s3cr$t'\n}\n"
              % receiver.url)
    proc = stand_in(tmp_path, config)
    assert proc.returncode == 0, proc.stdout
    assert [p[2]["event"] for p in receiver.posts][0] == "started" and len(receiver.posts) == 8
    expected = "Basic " + base64.b64encode(b"nfapi:s3cr$t").decode()
    assert {(path, headers.get("Authorization")) for path, headers, _ in receiver.posts} == {("/log?run=7", expected)}
    # No trace, report or timeline: no task metrics in the weblog (section 1.7).
    completed = [body["trace"] for _, _, body in receiver.posts if body["event"] == "process_completed"]
    assert len(completed) == 2 and not any("%cpu" in t or "peak_rss" in t for t in completed)
    assert b"s3cr$t" not in read(str(tmp_path / ".nextflow.log"))


def test_nextflow_23_04_ignores_basic_token(tmp_path, receiver):
    config = "weblog.enabled = true\nweblog.url = '%s/log?run=7&token=t'\nweblog.basicToken = 'nfapi:s'\n" % (
        receiver.url)
    proc = stand_in(tmp_path, config, env={"NXF_VER": "23.04.0"})
    assert proc.returncode == 0, proc.stdout
    assert {(path, headers.get("Authorization"), headers["User-Agent"]) for path, headers, _ in receiver.posts} == {
        ("/log?run=7&token=t", None, "Nextflow/23.04.0")}


def test_the_stand_in_writes_the_trace_file_as_nextflow_does(tmp_path, receiver):
    config = nfapi.run_config(str(tmp_path / "run"), receiver.url + "/log?run=1", "s", True)
    proc = stand_in(tmp_path, config, env={"FAKE_NF_FAIL": "B", "FAKE_NF_TASKS": "2", "FAKE_NF_TASK_SECONDS": "1"},
                    processes=("A", "B", "C"))
    assert proc.returncode == 1, proc.stdout
    with open(str(tmp_path / "run" / "trace.txt")) as f:
        lines = f.read().split("\n")
    assert lines[0].split("\t") == TRACE_FIELDS and lines[-1] == ""
    rows = [dict(zip(TRACE_FIELDS, line.split("\t"))) for line in lines[1:-1]]
    assert all(len(line.split("\t")) == len(TRACE_FIELDS) for line in lines[1:-1])
    assert sorted((r["task_id"], r["process"], r["status"], r["exit"]) for r in rows) == [
        ("1", "A", "COMPLETED", "0"), ("2", "A", "COMPLETED", "0"), ("3", "B", "FAILED", "1"),
        ("4", "B", "ABORTED", "-")]
    failed = next(r for r in rows if r["status"] == "FAILED")
    assert failed["error_action"] == "TERMINATE" and failed["tag"] == "-" and failed["hostname"] == "-"
    for row in rows:  # raw: epoch ms, ms and bytes as plain numbers; %cpu without `%`
        assert row["submit"].isdigit() and row["duration"].isdigit() and row["cpus"] == "1", row
        assert row["workdir"].startswith(str(tmp_path / "work"))
        assert row["native_id"].isdigit() or row["status"] == "ABORTED"  # killed before it started
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    assert all(float(r["%cpu"]) > 0 and r["peak_rss"].isdigit() and r["rchar"].isdigit() for r in completed)
    # The trace is on, so the weblog's completed tasks carry the same metrics.
    posted = {b["trace"]["task_id"]: b["trace"] for _, _, b in receiver.posts if b["event"] == "process_completed"}
    for row in completed:
        task = posted[int(row["task_id"])]
        assert (task["%cpu"], task["peak_rss"], task["realtime"]) == (float(row["%cpu"]), int(row["peak_rss"]),
                                                                      int(row["realtime"]))
    for name in ("report.html", "timeline.html"):
        assert "<html" in (tmp_path / "run" / name).read_text()


def test_the_stand_in_keeps_or_refuses_existing_reports_as_configured(tmp_path):
    (tmp_path / "trace.txt").write_text("old\n")
    proc = stand_in(tmp_path, "trace { enabled = true\n file = '%s' }\n" % (tmp_path / "trace.txt"))
    assert proc.returncode == 1 and "Trace file already exists: %s" % (tmp_path / "trace.txt") in proc.stdout
    proc = stand_in(tmp_path, "trace { enabled = true\n fields = 'task_id,nope' }\n", name="second")
    assert proc.returncode == 1 and "Not a valid trace field name: 'nope'" in proc.stdout
    proc = stand_in(tmp_path, "trace {\n    enabled = true\n    file = 'it's.txt'\n}\n", name="third")
    assert proc.returncode == 1 and "Unable to parse config file" in proc.stdout


def test_the_stand_in_drops_posts_when_asked(tmp_path, receiver):
    config = "weblog { enabled = true; url = '%s/log' }\n" % receiver.url
    proc = stand_in(tmp_path, config, env={"FAKE_NF_DROP_POSTS": "process_completed:1,process_started:2"})
    assert proc.returncode == 0, proc.stdout
    assert [b["event"] for _, _, b in receiver.posts].count("process_completed") == 1
    assert [b["event"] for _, _, b in receiver.posts].count("process_started") == 0


def test_the_stand_in_answers_version_and_plugin_install(tmp_path):
    def nextflow(*args, **env):
        return subprocess.run([PYTHON, FAKE_NEXTFLOW] + list(args), capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, NXF_HOME=str(tmp_path / "home"), **env))
    full = nextflow("-version")
    assert full.returncode == 0 and "      N E X T F L O W\n      version 24.10.0 build " in full.stdout
    assert nextflow("-v").stdout.startswith("nextflow version 24.10.0.")
    assert "      version 23.04.0 build " in nextflow("-version", NXF_VER="23.04.0").stdout
    install = nextflow("plugin", "install", "nf-weblog@1.1.2")
    assert install.returncode == 0 and install.stdout == "Downloading plugin nf-weblog@1.1.2\n"
    assert os.path.isdir(str(tmp_path / "home" / "plugins" / "nf-weblog-1.1.2"))
    assert nextflow("plugin", "install", "nf-weblog@1.1.2").stdout == ""  # already there
    assert nextflow("plugin", "install").returncode == 1


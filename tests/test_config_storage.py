"""Configuration errors stop start-up clearly; the database is WAL, versioned and reconciled; stdlib only."""

import ast
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import sysconfig

import pytest

from conftest import PYTHON, ROOT, ServerProcess, old_database


def start_with_config(tmp_path, text):
    path = tmp_path / "bad-config.json"
    path.write_text(text)
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", str(path), "--data",
                           str(tmp_path / "data"), "--port", "0"], capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stderr


def pipeline_config(**changes):
    spec = {"directory": os.path.join(ROOT, "examples/demo"), "script": "main.nf"}
    spec.update(changes)
    return json.dumps({"nextflow_workflows": {"P": spec}})


@pytest.mark.parametrize("text, where, what", [
    ("{", "(top level)", "not valid JSON"),
    ("[]", "(top level)", "must be an object"),
    ('{"nextflow_workflows": {}, "max_upload_bytes": -5}', "max_upload_bytes", "positive integer"),
    ('{"nextflow_workflows": {}, "colour": 1}', "colour", "unknown setting"),
    ('{}', "nextflow_workflows", "must be an object"),
    (pipeline_config(script="missing.nf"), "nextflow_workflows.P.script", "no such file"),
    (pipeline_config(pipeline="nf-core/demo"), "nextflow_workflows.P", "not both"),
    (pipeline_config(args={"dynamic": {"x": {"type": "float"}}}), "nextflow_workflows.P.args.dynamic.x.type", "must be one of"),
    (pipeline_config(args={"dynamic": {"x": {"type": "number", "value": "ten"}}}), "args.dynamic.x.value", "must be a number"),
    (pipeline_config(args={"dynamic": {"x": {"type": "text", "is_multline": True}}}), "args.dynamic.x.is_multline", "unknown key"),
    (pipeline_config(args={"static": {"x": {"type": "text"}}}), "args.static.x.value", "needs a value"),
    (pipeline_config(args={"static": {"x": {"type": "path", "value": "../../etc"}}}), "args.static.x.value", "'..'"),
    (pipeline_config(nextflow_parameters="-profile slurm"), "P.nextflow_parameters", "list of strings"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, where, what):
    code, stderr = start_with_config(tmp_path, text)
    assert code != 0
    assert "bad-config.json" in stderr and where in stderr and what in stderr, stderr
    assert "Traceback" not in stderr


def test_missing_config_file(tmp_path):
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", str(tmp_path / "nope.json"),
                           "--data", str(tmp_path / "d"), "--port", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "nope.json" in proc.stderr and "cannot read" in proc.stderr


def test_database_is_wal_and_versioned(api, server):
    api.create("x")
    conn = sqlite3.connect(os.path.join(server.data, "nfapi.sqlite3"))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        import nfapi
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(nfapi.MIGRATIONS)
        assert conn.execute("SELECT name FROM workflows").fetchall() == [("x",)]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_restart_reconciles_leftovers(tmp_path):
    srv = ServerProcess(tmp_path).start()
    api = srv.client()
    keep = api.create("keep")
    gone = api.create("gone")
    srv.stop()
    data = srv.data
    with open(os.path.join(data, "tmp", ".nfapi-upload-dead"), "wb") as f:
        f.write(b"partial")
    conn = sqlite3.connect(os.path.join(data, "nfapi.sqlite3"))
    with conn:
        conn.execute("DELETE FROM workflows WHERE id = ?", (gone,))
    conn.close()
    srv.start()
    try:
        assert os.listdir(os.path.join(data, "tmp")) == []
        assert sorted(os.listdir(os.path.join(data, "workflows"))) == [str(keep)]
        assert srv.client().get("/api/workflows/count").json() == {"count": 1}
    finally:
        srv.stop()


def stdlib_imports(path):
    tree = ast.parse(open(path).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def is_stdlib(module):
    """True for a standard-library module (sys.stdlib_module_names is 3.10+; 3.8 asks the import system)."""
    if hasattr(sys, "stdlib_module_names"):
        return module in sys.stdlib_module_names
    if module in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    stdlib = sysconfig.get_paths()["stdlib"]
    return spec.origin.startswith(stdlib) and "site-packages" not in spec.origin


def test_is_stdlib_tells_them_apart():
    assert is_stdlib("sqlite3") and is_stdlib("http") and is_stdlib("sys")
    assert not is_stdlib("pytest") and not is_stdlib("no_such_module_here")


@pytest.mark.parametrize("name", ["nfapi.py", "nfapi_worker.py"])
def test_runtime_imports_only_the_standard_library(name):
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        pytest.skip("%s not written yet" % name)
    assert {m for m in stdlib_imports(path) if not is_stdlib(m)} == set()


def test_an_old_database_is_migrated(tmp_path):
    import nfapi
    with old_database(tmp_path, 1) as conn:
        conn.execute("INSERT INTO workflows (name, created_at) VALUES ('from version 1', 0)")
    srv = ServerProcess(tmp_path).start()
    try:
        wf = srv.client().get("/api/workflows/1").json()["workflow"]
        assert wf["name"] == "from version 1" and wf["run"] is None
    finally:
        srv.stop()
    conn = sqlite3.connect(str(tmp_path / "data" / "nfapi.sqlite3"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(nfapi.MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    conn.close()

"""Launch forms from nextflow_schema.json, validation on update and schedule, and the command preview."""

import glob
import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, ServerProcess, wait_final

SAMPLES = os.path.join(ROOT, "tests", "data", "nextflow-schema-samples")
SCHEMA_DEMO = "Schema demo (Local)"


def config_with(tmp_path, pipelines):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lease_seconds": 2, "nextflow_workflows": pipelines}))
    return str(path)


def sample_pipeline(name, **extra):
    spec = {"directory": os.path.join(ROOT, "examples", "demo"), "script": "main.nf",
            "schema": os.path.join(SAMPLES, name)}
    spec.update(extra)
    return spec


@pytest.fixture
def samples_server(tmp_path):
    pipelines = {os.path.basename(path): sample_pipeline(os.path.basename(path))
                 for path in sorted(glob.glob(os.path.join(SAMPLES, "*.json")))}
    pipelines["demo with hidden"] = sample_pipeline("nfcore-demo-2020-12.nextflow_schema.json", include_hidden=True)
    pipelines["demo overridden"] = sample_pipeline("nfcore-demo-draft07.nextflow_schema.json", args={
        "dynamic": {"genome": {"type": "select", "options": ["GRCh38", "GRCm39"], "desc": "Genome"},
                    "extra": {"type": "text", "desc": "added by the operator"}},
        "static": {"outdir": {"type": "path", "value": "results"}}})
    srv = ServerProcess(tmp_path, config=config_with(tmp_path, pipelines)).start()
    yield srv
    srv.stop()


def arguments(api, name):
    resp = api.get("/api/nextflow-workflows/%s/arguments" % name.replace(" ", "%20"))
    assert resp.status == 200, resp
    return resp.json()["arguments"]


def test_every_sample_schema_loads(samples_server):
    api = samples_server.client()
    names = api.get("/api/nextflow-workflows").json()["nextflow_workflows"]
    assert len([n for n in names if n.endswith(".json")]) == len(glob.glob(os.path.join(SAMPLES, "*.json"))) == 6
    for name in names:
        arguments(api, name)


def test_nf_core_demo_2020_12_and_draft07(samples_server):
    api = samples_server.client()
    for name in ("nfcore-demo-2020-12.nextflow_schema.json", "nfcore-demo-draft07.nextflow_schema.json"):
        args = arguments(api, name)
        assert list(args) == ["input", "outdir", "email", "multiqc_title", "genome", "fasta", "skip_trim",
                              "multiqc_methods_description"]
        assert args["input"]["type"] == "path" and args["input"]["selectable_files"] is True
        assert args["input"]["selectable_folders"] is False and args["input"]["exists"] is True
        assert args["input"]["required"] is True and args["input"]["group"] == "Input/output options"
        assert args["input"]["pattern"].startswith("^\\\\S+\\\\.") or args["input"]["pattern"].startswith("^\\S+\\.")
        assert args["outdir"]["type"] == "path" and args["outdir"]["selectable_folders"] is True
        assert args["outdir"]["selectable_files"] is False and args["outdir"]["required"] is True
        assert args["email"]["type"] == "text" and args["email"]["required"] is False and "pattern" in args["email"]
        assert args["skip_trim"] == {"type": "boolean", "desc": args["skip_trim"]["desc"], "value": None,
                                     "required": False, "group": "Process skipping options"}
        assert "help_text" in args["input"] and args["input"]["desc"]
        assert "publish_dir_mode" not in args and "igenomes_base" not in args  # hidden


def test_hidden_parameters_on_request(samples_server):
    args = arguments(samples_server.client(), "demo with hidden")
    assert args["publish_dir_mode"]["type"] == "select" and args["publish_dir_mode"]["value"] == "copy"
    assert "symlink" in args["publish_dir_mode"]["options"] and args["publish_dir_mode"]["hidden"] is True
    # An s3:// default is not a workflow path: the pipeline keeps its own default.
    assert args["igenomes_base"]["type"] == "path" and args["igenomes_base"]["value"] is None
    assert args["validate_params"]["value"] is True


def test_numbers_patterns_and_top_level_properties(samples_server):
    api = samples_server.client()
    args = arguments(api, "nfschema-test-required_numerics.nextflow_schema.json")
    assert args["integer"]["type"] == "number" and args["integer"]["integer"] is True and args["integer"]["required"] is True
    assert args["number"]["type"] == "number" and args["number"]["integer"] is False
    glob_args = arguments(api, "nfschema-test-file_path_pattern.nextflow_schema.json")
    assert glob_args["glob"]["type"] == "file-glob"
    meta = arguments(api, "nfschema-parameters_meta_schema.json")  # top-level properties, objects/arrays left out
    assert {"$schema", "title", "description"} <= set(meta) and "$defs" not in meta and "allOf" not in meta
    assert arguments(api, "nfcore-demo-2020-12.schema_input.json") == {}


def test_config_overrides_and_extends_the_schema(samples_server):
    args = arguments(samples_server.client(), "demo overridden")
    assert args["genome"]["type"] == "select" and args["genome"]["options"] == ["GRCh38", "GRCm39"]
    assert args["extra"]["type"] == "text" and "outdir" not in args
    assert list(args)[:2] == ["input", "email"]


@pytest.mark.parametrize("schema, message", [
    ("{", "not valid JSON"),
    ('{"$defs": {}, "allOf": [{"$ref": "#/$defs/missing"}]}', "missing"),
    ('{"properties": {"x": {"type": "string", "pattern": "(["}}}', "not a valid regular expression"),
    ('{"properties": {"x": {"type": "integer", "minimum": "one"}}}', "wrong type"),
    ('{"properties": {"x": {"enum": []}}}', "options"),
    ('[]', "JSON object"),
])
def test_broken_schema_stops_start_up(tmp_path, schema, message):
    path = tmp_path / "nextflow_schema.json"
    path.write_text(schema)
    config = config_with(tmp_path, {"P": sample_pipeline(str(path))})
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "nfapi.py"), "--config", config, "--data", str(tmp_path / "d"),
                           "--port", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "nextflow_workflows.P" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def schema_workflow(api):
    wid = api.create("schema")
    assert api.post("/api/workflows/%d/update" % wid, {"nextflow_workflow": SCHEMA_DEMO}).status == 200
    return wid


def update(api, wid, **values):
    return api.post("/api/workflows/%d/update" % wid, {"nextflow_arguments": values})


@pytest.mark.parametrize("name, good, bad, message", [
    ("min_quality", 30, 30.5, "whole number"),
    ("min_quality", 0, -1, "at least 0"),
    ("min_quality", 60, 61, "at most 60"),
    ("min_quality", 5, "5", "must be a number"),
    ("trim", False, "yes", "true or false"),
    ("aligner", "minimap2", "star", "must be one of"),
    ("label", "run 1", "run;rm", "must match the pattern"),
    ("label", "x" * 40, "x" * 41, "at most 40 characters"),
    ("samplesheet", "sheet.csv", "sheet.txt", "must match the pattern"),
    ("samplesheet", "sub/sheet.csv", "../sheet.csv", "'..'"),
    ("reads", "/data/*.fq", "//data/*.fq", "relative"),
])
def test_update_validation(api, name, good, bad, message):
    wid = schema_workflow(api)
    assert update(api, wid, **{name: good}).status == 200
    before = api.get("/api/workflows/%d" % wid).json()
    resp = update(api, wid, **{name: bad, "label": "changed"} if name != "label" else {name: bad, "trim": False})
    assert resp.status == 422
    assert list(resp.json()["errors"]) == [name] and message in resp.json()["errors"][name][0], resp.json()
    assert api.get("/api/workflows/%d" % wid).json() == before


def test_schedule_validation_against_the_disk(api):
    wid = schema_workflow(api)
    resp = api.post("/api/workflows/%d/schedule" % wid)
    assert resp.status == 422 and resp.json() == {"errors": {
        "samplesheet": ["cannot be empty"], "reads": ["matches no file in the workflow folder"]}}
    update(api, wid, samplesheet="sheet.csv")
    assert api.post("/api/workflows/%d/schedule" % wid).json()["errors"]["samplesheet"] == ["sheet.csv does not exist"]
    api.post("/api/workflows/%d/create-folder" % wid, {"path": "sheet.csv"})
    assert api.post("/api/workflows/%d/schedule" % wid).json()["errors"]["samplesheet"] == [
        "sheet.csv is a folder, a file is expected"]
    api.post("/api/workflows/%d/delete-path" % wid, {"path": "sheet.csv"})
    api.upload(wid, "sheet.csv", b"sample,fastq\n")
    api.upload(wid, "results", b"a file where a folder belongs")
    api.upload(wid, "a.fastq", b"@r\nA\n", directory="reads")
    assert api.post("/api/workflows/%d/schedule" % wid).json() == {"errors": {
        "outdir": ["results is a file, a folder is expected"]}}
    api.post("/api/workflows/%d/delete-path" % wid, {"path": "results"})
    # Optional and empty is fine: the parameter is left out and the pipeline's default applies.
    update(api, wid, label="")
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200


def test_preview_is_what_the_worker_runs(stand):
    worker = stand.worker()
    api = stand.client()
    wid = schema_workflow(api)
    api.upload(wid, "sheet.csv", b"sample,fastq\n")
    api.upload(wid, "a.fastq", b"@r\nA\n", directory="reads")
    update(api, wid, samplesheet="sheet.csv", aligner="bowtie2", label="")
    preview = api.get("/api/workflows/%d/command" % wid)
    assert preview.status == 200, preview
    preview = preview.json()
    assert "label" not in preview["params"] and preview["params"]["min_quality"] == 20
    assert preview["params"]["trim"] is True and preview["params"]["aligner"] == "bowtie2"
    api.post("/api/workflows/%d/schedule" % wid)
    run = wait_final(api, wid)["run"]
    assert run["status"] == "succeeded", run
    record = worker.records()["nfapi-run-%d" % run["id"]]
    expected = [arg.replace("<run id>", str(run["id"])) for arg in preview["argv"]]
    assert record["argv"] == expected
    assert json.loads(record["params_file"]) == preview["params"]
    assert record["cwd"] == preview["cwd"]
    resume = api.get("/api/workflows/%d/command?resume=true" % wid).json()
    assert resume["argv"][-2:] == ["-resume", run["session_id"]]
    assert api.get("/api/workflows/%d/command?resume=maybe" % wid).status == 422
    other = api.create("empty")
    assert api.get("/api/workflows/%d/command" % other).status == 422

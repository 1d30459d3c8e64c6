"""`nfapi_worker.py --check`: every check passes on a good node and names the fix on a broken one.

The node is made of small stand-ins written per test: a `nextflow` that prints the banner real Nextflow
prints for `-version`, a `java` that prints its version on stderr as `java -version` does, and an
NXF_HOME with (or without) the nf-weblog plugin, a pulled pipeline and a Nextflow framework.
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import PYTHON, ROOT, ServerProcess

NEXTFLOW_BANNER = """
      N E X T F L O W
      version {version} build 5934
      created 20-01-2025 12:05 UTC (13:05 CEST)
      cite doi:10.1038/nbt.3820
      http://nextflow.io

"""


def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


class Node:
    """What the worker's node has: stand-in nextflow and java on PATH, and an NXF_HOME."""

    def __init__(self, tmp_path, nextflow="24.10.4", java="17.0.2"):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.nxf_home = tmp_path / "nxf-home"
        self.nxf_home.mkdir()
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.set_nextflow(nextflow)
        self.set_java(java)
        self.env = {"PATH": "%s:/usr/bin:/bin" % self.bin, "HOME": str(self.home), "NXF_HOME": str(self.nxf_home)}

    def set_nextflow(self, version):
        banner = NEXTFLOW_BANNER.format(version=version).replace("'", "")
        self.nextflow = write_executable(self.bin / "nextflow", "#!/bin/sh\n[ \"$1\" = -version ] || exit 1\n"
                                                                "printf '%s'\n" % banner.replace("\n", "\\n"))

    def set_java(self, version):
        write_executable(self.bin / "java", "#!/bin/sh\necho 'openjdk version \"%s\" 2022-01-18' >&2\n"
                                            "echo 'OpenJDK Runtime Environment (build %s+8-86)' >&2\n" % (version, version))

    def add(self, *parts):
        """Make a folder (with a file in it) under NXF_HOME: a plugin, a pulled pipeline, a framework."""
        folder = self.nxf_home.joinpath(*parts)
        folder.mkdir(parents=True)
        (folder / "x").write_text("x")

    def check(self, server, token=None, url=None, nextflow=None, env=None, prefix=()):
        """(exit status, {check name: [(level, text)]}) of `nfapi_worker.py --check` on this node."""
        all_env = dict(self.env, NFAPI_TOKEN=token or server.token, **(env or {}))
        proc = subprocess.run(list(prefix) + [PYTHON, os.path.join(ROOT, "nfapi_worker.py"), "--check",
                                              "--server", url or server.url, "--nextflow", nextflow or self.nextflow],
                              env=all_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = {}
        for line in proc.stdout.splitlines():
            level, name, text = line[:7].strip(), line[8:30].strip(), line[31:]
            assert level in ("ok", "warn", "PROBLEM"), line
            assert (" -- fix: " in text) == (level != "ok"), line  # every problem says how to fix it
            lines.setdefault(name, []).append((level, text))
        return proc.returncode, lines


def levels(lines, name):
    return [level for level, _ in lines[name]]


@pytest.fixture
def setup(tmp_path):
    """A server with a local, a remote and a pinned pipeline, and a node that has all they need."""
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    (pipes / "main.nf").write_text("workflow { }\n")
    config = {"nextflow_workflows": {
        "local": {"directory": str(pipes), "script": "main.nf"},
        "remote": {"pipeline": "nf-core/demo", "revision": "1.0.1"},
        "pinned": {"directory": str(pipes), "script": "main.nf", "nextflow_version": "24.04.4"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    server = ServerProcess(tmp_path, config=str(tmp_path / "config.json")).start()
    node = Node(tmp_path)
    node.add("plugins", "nf-weblog-1.1.2")
    node.add("assets", "nf-core", "demo")
    node.add("framework", "24.04.4")
    try:
        yield server, node
    finally:
        server.stop()


def test_a_good_node_passes_every_check(setup):
    server, node = setup
    status, lines = node.check(server, env={"NXF_OFFLINE": "true"})
    assert status == 0, lines
    assert set(lines) == {"nextflow", "java", "nf-weblog", "server", "data folder", "pipeline local",
                          "pipeline remote", "pipeline pinned"}
    assert all(level == "ok" for found in lines.values() for level, _ in found), lines
    assert "version 24.10.4" in lines["nextflow"][0][1] and "Java 17.0.2" in lines["java"][0][1]
    assert len(lines["data folder"]) == 3  # reads the workflow folders, writes in launch/ and runs/


def test_no_nextflow(setup):
    server, node = setup
    status, lines = node.check(server, nextflow=str(node.bin / "no-such-nextflow"))
    assert status == 1
    assert levels(lines, "nextflow") == ["PROBLEM"] and "install Nextflow" in lines["nextflow"][0][1]


def test_a_nextflow_that_cannot_tell_its_version(setup):
    server, node = setup
    broken = write_executable(node.bin / "broken-nextflow", "#!/bin/sh\necho \"ERROR: Cannot find Java or it's a "
                                                             "wrong version\" >&2\nexit 1\n")
    status, lines = node.check(server, nextflow=broken)
    assert status == 1
    assert levels(lines, "nextflow") == ["PROBLEM"] and "Cannot find Java" in lines["nextflow"][0][1]


@pytest.mark.parametrize("nextflow, java, minimum, good", [
    ("25.04.6", "11.0.2", 17, False),
    ("25.04.6", "17.0.2", 17, True),
    ("24.10.4", "1.8.0_382", 11, False),
    ("24.10.4", "11.0.22", 11, True),
])
def test_java_against_the_minimum_of_that_nextflow(setup, nextflow, java, minimum, good):
    server, node = setup
    node.set_nextflow(nextflow)
    node.set_java(java)
    status, lines = node.check(server)
    assert levels(lines, "java") == (["ok"] if good else ["PROBLEM"]), lines["java"]
    assert "needs %s" % ("%d+" % minimum if good else "Java %d or later" % minimum) in lines["java"][0][1]
    assert status == (0 if good else 1)


def test_missing_weblog_plugin(setup):
    """Offline, a run without nf-weblog reports nothing: a problem with the exact install command;
    online Nextflow downloads it, so only a warning."""
    server, node = setup
    shutil.rmtree(str(node.nxf_home / "plugins"))
    status, lines = node.check(server, env={"NXF_OFFLINE": "true"})
    assert status == 1 and levels(lines, "nf-weblog") == ["PROBLEM"]
    assert "fix: nextflow plugin install nf-weblog@1.1.2" in lines["nf-weblog"][0][1]
    status, lines = node.check(server)
    assert status == 0 and levels(lines, "nf-weblog") == ["warn"]
    assert "NXF_OFFLINE=true" in lines["nf-weblog"][0][1] and "nextflow plugin install nf-weblog@1.1.2" in \
        lines["nf-weblog"][0][1]


def test_the_plugins_folder_can_be_elsewhere(setup, tmp_path):
    server, node = setup
    shutil.move(str(node.nxf_home / "plugins"), str(tmp_path / "plugins"))
    status, lines = node.check(server, env={"NXF_OFFLINE": "true", "NXF_PLUGINS_DIR": str(tmp_path / "plugins")})
    assert status == 0 and levels(lines, "nf-weblog") == ["ok"]


def test_nextflow_before_the_plugin_has_the_weblog_built_in(setup):
    server, node = setup
    shutil.rmtree(str(node.nxf_home / "plugins"))
    node.set_nextflow("23.04.3")
    status, lines = node.check(server, env={"NXF_OFFLINE": "true"})
    assert status == 0 and levels(lines, "nf-weblog") == ["ok"] and "built into" in lines["nf-weblog"][0][1]


def test_server_unreachable_or_token_refused(setup):
    server, node = setup
    status, lines = node.check(server, url="http://127.0.0.1:9")
    assert status == 1 and levels(lines, "server") == ["PROBLEM"] and "cannot reach" in lines["server"][0][1]
    assert "data folder" not in lines  # nothing to compare with
    status, lines = node.check(server, token="not-the-token")
    assert status == 1 and levels(lines, "server") == ["PROBLEM"] and "refused the token" in lines["server"][0][1]


def test_unshared_data_folder(setup):
    """The worker's node does not see the server's data folder. Simulated honestly: the worker runs in
    a mount namespace of its own in which an empty tmpfs covers the data folder's path, which is what a
    compute node without the shared filesystem (or with a local folder of the same name) sees. The
    server, outside the namespace, keeps its folder."""
    server, node = setup
    data = server.data
    as_root = [] if os.geteuid() == 0 else ["--map-root-user"]
    namespace = ["unshare", "--mount"] + as_root + ["sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', data]
    if shutil.which("unshare") is None or subprocess.run(namespace + ["true"]).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    status, lines = node.check(server, prefix=namespace)
    assert status == 1
    assert levels(lines, "data folder") == ["PROBLEM"] * 4, lines["data folder"]
    texts = " ".join(text for _, text in lines["data folder"])
    assert "another folder than the server's" in texts and "cannot write in %s/runs" % data in texts
    assert "mount the server's data folder on this node at the same path (%s)" % data in texts


def test_pipelines_on_an_offline_node(setup):
    """Offline, a remote pipeline must be pulled and a pinned Nextflow fetched ahead; a local script
    must be there. Online the first two are only warnings."""
    server, node = setup
    shutil.rmtree(str(node.nxf_home / "assets"))
    shutil.rmtree(str(node.nxf_home / "framework"))
    status, lines = node.check(server, env={"NXF_OFFLINE": "true"})
    assert status == 1
    assert levels(lines, "pipeline remote") == ["PROBLEM"]
    assert "fix: nextflow pull nf-core/demo -r 1.0.1" in lines["pipeline remote"][0][1]
    assert levels(lines, "pipeline pinned") == ["ok", "PROBLEM"]
    assert "fix: NXF_VER=24.04.4 nextflow -version" in lines["pipeline pinned"][1][1]
    status, lines = node.check(server)
    assert status == 0
    assert levels(lines, "pipeline remote") == ["warn"] and levels(lines, "pipeline pinned") == ["ok", "warn"]
    os.unlink(os.path.join(str(server.tmp_path), "pipes", "main.nf"))
    status, lines = node.check(server)
    assert status == 1 and levels(lines, "pipeline local") == ["PROBLEM"]

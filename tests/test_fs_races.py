"""Issue 11 finding 3: a folder swapped for a symlink between the server's check and its operation.

Another local user (or a pipeline task writing in the workflow folder) can exchange a folder with a
symlink to an outside folder at any moment, with renameat2(RENAME_EXCHANGE). A process here does that
in a loop while the server serves requests on paths through that folder: nothing outside may ever be
deleted, written, listed, archived or accepted. Also: FIFOs, symlinks and names that are not UTF-8.
"""

import ctypes
import http.client
import io
import os
import platform
import socket
import signal
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile

import pytest

from conftest import wait_for

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
SECRET = b"OUTSIDE-SECRET"
TRIES = 2000  # requests per operation
DEADLINE = 30.0  # seconds per operation


def renameat2():
    """A function exchanging two paths atomically, or None where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: function(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    number = SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    libc.syscall.restype = ctypes.c_long
    return lambda a, b: libc.syscall(number, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)


def exchanges(a, b):
    """Whether `a` and `b` can be exchanged here (done twice: they end as they were)."""
    exchange = renameat2()
    a, b = os.fsencode(a), os.fsencode(b)
    return exchange is not None and exchange(a, b) == 0 and exchange(a, b) == 0


def swap_until_stopped(a, b):
    """The swapper's own process (another local user's, in effect): exchange `a` and `b` until
    SIGTERM, leave the real folder under its own name, and print how many swaps were made."""
    exchange, a, b = renameat2(), os.fsencode(a), os.fsencode(b)
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    print("swapping", flush=True)
    swaps = 0
    while not stopping:
        swaps += exchange(a, b) == 0
    if os.path.islink(a):
        exchange(a, b)
    print(swaps, flush=True)


class Swapper:
    def __init__(self, a, b):
        self.proc = subprocess.Popen([sys.executable, __file__, a, b], stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"swapping\n"
        self.swaps = None

    def stop(self):
        self.proc.terminate()
        self.swaps = int(self.proc.communicate(timeout=10)[0])


@pytest.fixture
def race(api, server, tmp_path):
    """A workflow whose folder `sub` keeps trading places with `swap-link` -> an outside folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(SECRET)
    (outside / "outside-only.fastq").write_bytes(SECRET)
    wid = api.create("race")
    api.upload(wid, "ref.fa", b">r\nACGT\n")
    api.upload(wid, "x.fastq", b"@r\nACGT\n")
    api.upload(wid, "victim.txt", b"inside", directory="sub")
    root = os.path.join(server.data, "workflows", str(wid))
    sub, link = os.path.join(root, "sub"), os.path.join(root, "swap-link")
    os.symlink(str(outside), link)
    if not exchanges(sub, link):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (%s)" % platform.machine())
    real = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    swapper = Swapper(sub, link)
    try:
        yield types.SimpleNamespace(wid=wid, root=root, outside=str(outside), real=real)
    finally:
        swapper.stop()
        os.close(real)
    print("%d swaps" % swapper.swaps)
    assert swapper.swaps > 2000, "the swapper did not keep up"
    assert os.path.isfile(os.path.join(str(outside), "victim.txt"))


def attempts(operation):
    """Run operation(i) up to TRIES times within DEADLINE; return (escapes, {status: count})."""
    escapes, statuses, deadline = 0, {}, time.monotonic() + DEADLINE
    tries = 0
    while tries < TRIES and time.monotonic() < deadline:
        status, escaped = operation(tries)
        statuses[status] = statuses.get(status, 0) + 1
        escapes += bool(escaped)
        tries += 1
    print("%s: %d of %d tries escaped; answers %s" % (operation.__name__, escapes, tries, statuses))
    return escapes, statuses


def expect_safe(escapes, statuses, allowed):
    assert escapes == 0
    assert set(statuses) <= set(allowed), statuses


def test_delete_path_never_deletes_outside(api, race):
    victim = os.path.join(race.outside, "victim.txt")

    def delete(i):
        fd = os.open("victim.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=race.real)
        os.close(fd)
        status = api.post("/api/workflows/%d/delete-path" % race.wid, {"path": "sub/victim.txt"}).status
        escaped = not os.path.exists(victim)
        if escaped:
            with open(victim, "wb") as f:
                f.write(SECRET)
        return status, escaped
    expect_safe(*attempts(delete), allowed=(200, 404, 422))


def test_upload_never_writes_outside(api, race):
    def upload(i):
        status = api.upload(race.wid, "planted-%d.txt" % i, b"planted", directory="sub").status
        return status, os.path.exists(os.path.join(race.outside, "planted-%d.txt" % i))
    expect_safe(*attempts(upload), allowed=(200, 409, 422))


def test_create_folder_never_creates_outside(api, race):
    def create(i):
        status = api.post("/api/workflows/%d/create-folder" % race.wid, {"path": "sub/made-%d" % i}).status
        return status, os.path.exists(os.path.join(race.outside, "made-%d" % i))
    expect_safe(*attempts(create), allowed=(200, 409, 422))


def test_files_listing_never_lists_outside(api, race):
    def listing(i):
        resp = api.get("/api/workflows/%d/files?dir=sub" % race.wid)
        return resp.status, resp.status == 200 and "outside-only.fastq" in resp.json()["files"]
    expect_safe(*attempts(listing), allowed=(200, 422))


def test_archives_never_carry_outside_files(api, race):
    def archive(i):
        path, fmt = [("sub", "zip"), ("", "zip"), ("sub", "tar.gz"), ("", "tar.gz")][i % 4]
        try:
            resp = api.get("/api/workflows/%d/download?path=%s&format=%s" % (race.wid, path, fmt))
        except (http.client.HTTPException, ValueError, OSError):
            api.reconnect()
            return "broken answer", False
        if resp.status != 200:
            return resp.status, False
        try:
            if fmt == "zip":
                with zipfile.ZipFile(io.BytesIO(resp.body)) as z:
                    contents = [z.read(n) for n in z.namelist()]
            else:
                with tarfile.open(fileobj=io.BytesIO(resp.body), mode="r:gz") as t:
                    contents = [t.extractfile(m).read() for m in t.getmembers() if m.isfile()]
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError):
            return "broken archive", SECRET in resp.body
        return resp.status, any(SECRET in c for c in contents)
    expect_safe(*attempts(archive), allowed=(200, 422))


def test_download_of_a_file_never_serves_outside(api, race):
    def download(i):
        resp = api.get("/api/workflows/%d/download?path=sub/victim.txt" % race.wid)
        return resp.status, SECRET in resp.body
    expect_safe(*attempts(download), allowed=(200, 404, 422))


def test_schedule_path_checks_never_look_outside(api, race):
    base = {"reference": "ref.fa", "reads": "*.fastq", "extra_files": []}
    checks = [dict(base, reference="sub/outside-only.fastq"), dict(base, reads="sub/outside-*.fastq"),
              dict(base, extra_files=["ref.fa", "sub/outside-only.fastq"])]
    outcomes = []
    for arguments in checks:
        resp = api.post("/api/workflows/%d/update" % race.wid, {"nextflow_workflow": "Hello World (Local)",
                                                               "nextflow_arguments": arguments})
        assert resp.status == 200, resp

        def command(i):
            # /command runs the same checks as /schedule, without queueing anything.
            status = api.get("/api/workflows/%d/command" % race.wid).status
            return status, status == 200
        command.__name__ = "command with %s" % sorted(arguments.items())
        outcomes.append(attempts(command))
    for escapes, statuses in outcomes:
        expect_safe(escapes, statuses, allowed=(422,))


# ==== FIFOs and symlinks ====

def raw_get(server, path, timeout):
    """The status of a GET, or None when no answer came within `timeout` seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer " + server.token})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except socket.timeout:
        return None
    finally:
        conn.close()


def test_fifo_downloads_answer_at_once(api, server):
    wid = api.create("fifo")
    root = os.path.join(server.data, "workflows", str(wid))
    os.mkfifo(os.path.join(root, "pipe"))
    api.upload(wid, "a.txt", b"kept", directory="folder")
    os.mkfifo(os.path.join(root, "folder", "pipe"))
    answers = [None] * 10

    def download(i):
        answers[i] = raw_get(server, "/api/workflows/%d/download?path=pipe" % wid, timeout=5)
    threads = [threading.Thread(target=download, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("FIFO downloads answered: %s" % answers)
    assert all(status is not None and 400 <= status < 500 for status in answers), answers
    wait_for(lambda: server.handler_threads() == 0, message="no server thread left stuck")
    # A folder holding a FIFO still downloads whole, without it.
    for fmt in ("zip", "tar.gz"):
        assert raw_get(server, "/api/workflows/%d/download?path=folder&format=%s" % (wid, fmt), timeout=5) == 200
    resp = api.get("/api/workflows/%d/download?path=folder" % wid)
    with zipfile.ZipFile(io.BytesIO(resp.body)) as z:
        assert z.namelist() == ["folder/", "folder/a.txt"]


def test_symlinks_serve_nothing(api, server, tmp_path):
    """A `.nextflow.log`-style symlink to an outside file, and a symlink loop, are served by nothing."""
    outside = tmp_path / "outside.log"
    outside.write_bytes(SECRET)
    wid = api.create("links")
    api.upload(wid, "real.txt", b"real", directory="logs")
    root = os.path.join(server.data, "workflows", str(wid))
    os.symlink(str(outside), os.path.join(root, ".nextflow.log"))
    os.symlink(str(outside), os.path.join(root, "logs", ".nextflow.log"))
    os.symlink("loop", os.path.join(root, "loop"))
    os.symlink("logs", os.path.join(root, "alias"))
    for path in (".nextflow.log", "logs/.nextflow.log", "loop", "loop/x", "alias", "alias/real.txt"):
        resp = api.get("/api/workflows/%d/download?path=%s" % (wid, path))
        assert resp.status == 422 and "symlink" in resp.json()["errors"]["path"][0], (path, resp)
    for path in ("loop", "alias"):
        resp = api.get("/api/workflows/%d/files?dir=%s" % (wid, path))
        assert resp.status == 422 and "symlink" in resp.json()["errors"]["dir"][0], (path, resp)
    for fmt in ("zip", "tar.gz"):
        resp = api.get("/api/workflows/%d/download?format=%s" % (wid, fmt))
        assert resp.status == 200 and SECRET not in resp.body, fmt
    assert api.get("/api/workflows/%d/files" % wid).json() == {
        "folders": ["logs"], "files": [".nextflow.log", "alias", "loop"]}


def test_names_that_are_not_utf8(api, server):
    """Listed without them, zipped without them (with a note in the log), tarred with their bytes."""
    wid = api.create("bytes")
    api.upload(wid, "plain.txt", b"plain")
    root = os.fsencode(os.path.join(server.data, "workflows", str(wid)))
    with open(os.path.join(root, b"\xff.txt"), "wb") as f:
        f.write(b"raw name")
    os.mkdir(os.path.join(root, b"dir-\xfe"))
    with open(os.path.join(root, b"dir-\xfe", b"inner.txt"), "wb") as f:
        f.write(b"inner")
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": ["plain.txt"]}
    resp = api.get("/api/workflows/%d/download" % wid)
    assert resp.status == 200
    with zipfile.ZipFile(io.BytesIO(resp.body)) as z:
        assert z.namelist() == ["workflow-%d/" % wid, "workflow-%d/plain.txt" % wid]
    wait_for(lambda: "not UTF-8" in server.output(), message="a note on the left-out names in the server log")
    resp = api.get("/api/workflows/%d/download?format=tar.gz" % wid)
    with tarfile.open(fileobj=io.BytesIO(resp.body), mode="r:gz", encoding="utf-8", errors="surrogateescape") as t:
        names = sorted(os.fsencode(n) for n in t.getnames())
        assert names == sorted(b"workflow-%d%s" % (wid, n) for n in (b"", b"/plain.txt", b"/\xff.txt", b"/dir-\xfe",
                                                                    b"/dir-\xfe/inner.txt"))
        assert t.extractfile(os.fsdecode(b"workflow-%d/\xff.txt" % wid)).read() == b"raw name"


if __name__ == "__main__":
    swap_until_stopped(sys.argv[1], sys.argv[2])

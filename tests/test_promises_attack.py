"""Attacks on the weblog's answer-first writes (Database.promise, Request.answer_first): a post
answered 200 is recorded, also after a kill, a failed write or crash damage; a start never stops at
the promises file; whoever got an answer reads what it told; one client cannot hold every request."""

import json
import os
import resource
import signal
import socket
import threading
import time
import urllib.parse

from conftest import ServerProcess, ready_workflow, weblog_target, write_config


def scheduled_run(api, name="wf"):
    """(workflow id, run id, weblog path with the run's secret) of a run claimed by a worker."""
    wid = ready_workflow(api, name=name)
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    url = weblog_target(api.post("/api/worker/claim", {"worker": "w", "wait": 0}).json()["run"])
    return wid, int(urllib.parse.parse_qs(url.query)["run"][0]), url.path + "?" + url.query


def task_post(task_id, status="COMPLETED", **extra):
    return dict({"trace": {"task_id": task_id, "status": status, "process": "P", "name": "P (%d)" % task_id},
                 "event": "process_completed", "runId": "a46afc37-6d46-4bec-885d-01b13dabc8c1"}, **extra)


def post(api, target, body):
    return api.request("POST", target, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                       token=False)


def task_ids(api, wid, run_id):
    tasks = api.get("/api/workflows/%d/runs/%d/tasks?limit=10000" % (wid, run_id)).json()["tasks"]
    return sorted(t["task_id"] for t in tasks)


def promises_path(srv):
    return os.path.join(srv.data, "nfapi.sqlite3-promised")


def promise_entry(wid, run_id, body):
    entry = b"%d %d\n%s" % (wid, run_id, body)
    return b"%d\n%s" % (len(entry), entry)


# ==== A start never stops at the promises file ====

def test_a_post_nothing_can_record_leaves_the_next_start_alone(tmp_path):
    """A trace whose status is a list or an object is junk like any other: it was answered 200 and
    then raised in its write (TypeError: unhashable type), and that entry of the promises file raised
    again at every start: the server could not start until someone deleted the file."""
    srv = ServerProcess(tmp_path).start()
    api = srv.client()
    wid, run_id, target = scheduled_run(api)
    for status in (["COMPLETED"], {"s": 1}):
        assert post(api, target, task_post(1, status)).status == 200
    assert post(api, target, task_post(2)).status == 200
    srv.stop()
    srv.start()
    try:
        assert task_ids(srv.client(), wid, run_id) == [2]
        assert os.path.getsize(promises_path(srv)) == 0
        assert "aborted" not in srv.output() and "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_a_damaged_entry_is_left_out_and_the_ones_around_it_are_kept(tmp_path):
    """Crash damage inside the promises file (the file is not synced: a power cut) must not stop the
    start: the entries whose frame is whole are kept, each alone; one that cannot be read is logged."""
    srv = ServerProcess(tmp_path).start()
    wid, run_id, _ = scheduled_run(srv.client())
    srv.stop()
    with open(promises_path(srv), "ab") as f:
        f.write(promise_entry(wid, run_id, json.dumps(task_post(1)).encode()))
        f.write(promise_entry(wid, run_id, b'{"trace": {"task_id": 2, "sta\0\0\0\0\0\0'))
        f.write(promise_entry(wid, run_id, json.dumps(task_post(3)).encode()))
        f.write(promise_entry(wid, run_id, json.dumps(task_post(4)).encode()))
        f.write(b"%d\n%d x\n{}" % (len(b"%d x\n{}" % wid), wid))
        f.write(promise_entry(wid, run_id, json.dumps(task_post(5)).encode()))
        f.write(b"99999999999999999\n{}")  # a length no entry has: nothing after it can be framed
    srv.start()
    try:
        assert task_ids(srv.client(), wid, run_id) == [1, 3, 4, 5]
        assert os.path.getsize(promises_path(srv)) == 0
        assert srv.output().count("nfapi: left out an entry of the promises file") == 2
    finally:
        srv.stop()


# ==== A post answered 200 is recorded ====

def test_a_post_whose_write_failed_after_its_answer_is_kept_by_the_next_start(tmp_path):
    """A promised write can fail after its 200 (here SQLite cannot grow the WAL: RLIMIT_FSIZE on the
    server stands for a full disk, while the promises file still takes a small entry). Its entry
    must stay in the promises file: emptying the file once it is over 1 MiB of later posts lost it."""
    srv = ServerProcess(tmp_path).start()
    api = srv.client()
    wid, run_id, target = scheduled_run(api)
    answered = []
    soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        for task in range(1, 200):
            if post(api, target, task_post(task)).status == 200:
                answered.append(task)
            if "nfapi: aborted" in srv.output():
                break
    finally:
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert "nfapi: aborted" in srv.output(), "no write failed"
    padding = "x" * (200 * 1024)  # a few of these fill the promises file past 1 MiB
    for task in range(1000, 1008):
        assert post(api, target, task_post(task, padding=padding)).status == 200
        answered.append(task)
    srv.stop(signal.SIGKILL)
    srv.start()
    try:
        recorded = task_ids(srv.client(), wid, run_id)
        assert [task for task in answered if task not in recorded] == []
    finally:
        srv.stop()


# ==== Whoever got an answer reads what it told ====

def test_whoever_got_the_answer_to_a_failed_task_reads_it_among_the_failed_tasks(tmp_path):
    """A FAILED task's post is remembered in the run's failed_tasks (remember_failed_tasks) before it
    is answered: a GET on another connection right after the answer shows it."""
    srv = ServerProcess(tmp_path).start()
    try:
        api, reader = srv.client(), srv.client()
        wid, run_id, target = scheduled_run(api)
        missed = 0
        for task in range(300, 0, -1):  # each one is the first failed task: failed_tasks shows it
            assert post(api, target, task_post(task, "FAILED")).status == 200
            run = reader.get("/api/workflows/%d/runs/%d" % (wid, run_id)).json()["run"]
            missed += [t["task_id"] for t in run["failed_tasks"]][:1] != [task]
        assert missed == 0, "%d of 300 GETs after the answer did not show the failed task" % missed
    finally:
        srv.stop()


# ==== One client cannot hold every request ====

def test_a_weblog_client_that_stops_reading_holds_no_other_request(tmp_path):
    """A client with a run's secret pipelines posts and never reads the answers. Once its socket is
    full, an answer sent while its promise is open would wait client_timeout, and every request
    that reads or writes the database with it."""
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, client_timeout=10)).start()
    try:
        api = srv.client()
        wid, run_id, target = scheduled_run(api)
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", srv.port))
        posts = b"".join(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (target.encode(), len(body), body)
                         for body in (json.dumps(task_post(task)).encode() for task in range(1, 30001)))

        def send():
            try:
                stalled.sendall(posts)
            except OSError:  # the server stopped reading, and closed the connection after client_timeout
                pass
        threading.Thread(target=send, daemon=True).start()
        slowest, seen, last_change = 0.0, None, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() - last_change < 2 and time.monotonic() < deadline:
            started = time.monotonic()
            count = api.get("/api/workflows/%d" % wid).json()["workflow"]["submitted_processes"]
            slowest = max(slowest, time.monotonic() - started)
            if count != seen:
                seen, last_change = count, time.monotonic()
            time.sleep(0.05)
        stalled.close()
        assert 0 < seen < 30000, "the client's answers never filled its socket"
        assert slowest < 3, "a GET waited %.1f s behind a client that stopped reading" % slowest
    finally:
        srv.stop()

"""Socket.IO 5 over Engine.IO 4 long-polling, as nf-cloud's web UI uses it (issue 15, item 4).

The first tests speak the wire format of the protocol documents (socket.io's
docs/engine.io-protocol/v4-current.md and docs/socket.io-protocol/v5-current.md) over plain HTTP;
the last one uses the real python-socketio client.
"""

import json
import threading
import time

import pytest

from conftest import ServerProcess, ready_workflow, wait_for, write_config

PATH = "/socket.io/?EIO=4&transport=polling"
SEPARATOR = "\x1e"


class RawSocket:
    """An Engine.IO session spoken by hand. Two connections, as a browser has: the GET may wait
    while a POST goes out."""

    def __init__(self, server):
        self.getter, self.poster = server.client(), server.client()
        resp = self.getter.get(PATH)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain"), resp
        body = resp.body.decode()
        assert body.startswith("0"), body
        self.handshake = json.loads(body[1:])
        self.url = PATH + "&sid=" + self.handshake["sid"]

    def post(self, *packets):
        body = packets[0] if isinstance(packets[0], bytes) else SEPARATOR.join(packets).encode()
        return self.poster.post(self.url, body, headers={"Content-Type": "text/plain;charset=UTF-8"})

    def get(self):
        return self.getter.get(self.url)

    def packets(self):
        """The packets of one GET; pings are answered as the client must."""
        resp = self.get()
        assert resp.status == 200, resp
        packets = resp.body.decode().split(SEPARATOR)
        if "2" in packets:
            assert self.post("3").body == b"ok"
        return packets


def events(packets):
    """Socket.IO EVENT packets of the main namespace (`42[...]`), decoded."""
    return [json.loads(p[2:]) for p in packets if p.startswith("42")]


def test_protocol_by_hand_join_a_room_and_follow_a_run(stand):
    api = stand.client()
    wid = ready_workflow(api)
    sock = RawSocket(stand)
    assert set(sock.handshake) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert sock.handshake["upgrades"] == [] and sock.handshake["pingInterval"] == 25000
    # CONNECT to the main namespace, answered with the socket's own id.
    resp = sock.post("40")
    assert resp.status == 200 and resp.body == b"ok"
    connected = sock.packets()
    assert len(connected) == 1 and connected[0].startswith("40")
    assert isinstance(json.loads(connected[0][2:])["sid"], str)
    # Join the workflow's room (two packets in one payload: the join, and an event with an ack id).
    assert sock.post('42["join",{"room":"workflow%d"}]' % wid, '421["unknown-event"]').body == b"ok"
    assert sock.packets() == ["431[]"]
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    seen = []
    deadline = time.monotonic() + 30
    while not any(name == "new-progress" for name, _ in seen):  # no worker yet: the new run at 0
        assert time.monotonic() < deadline, seen
        seen += events(sock.packets())
    stand.worker()
    while ["finished-workflow", {}] not in seen:
        assert time.monotonic() < deadline, seen
        seen += events(sock.packets())
    progress = [args for name, args in seen if name == "new-progress"]
    assert progress[0] == {"submitted_processes": 0, "completed_processes": 0}  # the new run starts at 0
    assert progress[-1] == {"submitted_processes": 2, "completed_processes": 2}
    assert len(progress) >= 3 and seen[-1] == ["finished-workflow", {}]
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "succeeded"
    # After `leave`, a second run tells this session nothing; the close packet ends the session.
    assert sock.post('42["leave",{"room":"workflow%d"}]' % wid).body == b"ok"
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "succeeded", timeout=30)
    assert sock.post("1").body == b"ok"
    gone = sock.get()
    assert gone.status == 400 and gone.json()["code"] == 1 and gone.json()["message"] == "Session ID unknown"


def test_protocol_errors_are_400_and_close_the_session(server):
    api = server.client()
    for path, code in (("/socket.io/", 5), ("/socket.io/?EIO=3&transport=polling", 5),
                       ("/socket.io/?EIO=4", 0), ("/socket.io/?EIO=4&transport=websocket", 0),
                       (PATH + "&sid=nosuchsession", 1)):
        resp = api.get(path)
        assert resp.status == 400 and resp.json()["code"] == code, (path, resp)
        assert resp.headers["Content-Type"] == "application/json"
    assert api.post(PATH, b"40").json()["code"] == 2  # a handshake is a GET
    # An event before the CONNECT packet, a packet of no known type, a binary packet, an upgrade:
    # each ends its session (the POST is 400, and so is anything after it).
    for bad in ('42["join",{"room":"workflow1"}]', "abc", "bAQIDBA==", "5", "", "40\x1e42not json", '40\x1e42[]', b"40\x1e4\xff"):
        sock = RawSocket(server)
        resp = sock.post(bad)
        assert resp.status == 400 and resp.json()["code"] == 3, (bad, resp)
        assert sock.get().status == 400, bad
    # Another namespace is refused with CONNECT_ERROR, and the session stays.
    sock = RawSocket(server)
    assert sock.post("40/admin,").body == b"ok"
    refused = sock.packets()
    assert refused[0].startswith("44/admin,") and "message" in json.loads(refused[0][len("44/admin,"):])
    assert "Traceback" not in server.output()


@pytest.fixture
def fast_ping(tmp_path):
    """A server whose Engine.IO sessions ping every second (and expire two seconds after the last pong)."""
    srv = ServerProcess(tmp_path, config=write_config(tmp_path, ping_interval=1)).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def test_ping_pong_keeps_a_session_and_silence_ends_it(fast_ping):
    sock = RawSocket(fast_ping)
    assert (sock.handshake["pingInterval"], sock.handshake["pingTimeout"]) == (1000, 1000)
    for _ in range(3):
        started = time.monotonic()
        assert sock.get().body == b"2"  # the server's ping, on the waiting GET
        assert 0.5 < time.monotonic() - started < 2
        assert sock.post("3").body == b"ok"
    # No pong: the session ends pingInterval + pingTimeout after the last one.
    last_pong = time.monotonic()
    wait_for(lambda: sock.get().status == 400, timeout=10, message="the session to expire")
    assert 1.5 < time.monotonic() - last_pong < 4


def test_a_second_waiting_get_closes_the_session(server):
    sock = RawSocket(server)
    clients = [server.client(), server.client()]
    answers = []
    threads = [threading.Thread(target=lambda c=c: answers.append(c.get(sock.url))) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Whichever came second is refused, and the one that was waiting is told the session closed.
    assert sorted((r.status, r.body[:1]) for r in answers) == [(200, b"1"), (400, b"{")]
    assert sock.get().status == 400


def test_the_close_packet_answers_the_waiting_get_with_noop(server):
    sock = RawSocket(server)
    # Once the handshake's handler thread has ended, one thread more can only be the GET's.
    wait_for(lambda: server.handler_threads() == 0, message="the handshake's handler thread to end")
    waiting = server.client()
    getter = threading.Thread(target=lambda: setattr(getter, "resp", waiting.get(sock.url)))
    getter.start()
    wait_for(lambda: server.handler_threads() > 0, message="the GET's connection")
    assert sock.post("1").body == b"ok"
    getter.join()
    assert getter.resp.status == 200 and getter.resp.body == b"6"
    assert sock.get().status == 400


def test_bounded_sessions_and_bodies(fast_ping):
    sock = RawSocket(fast_ping)
    big = sock.post("4" + "x" * (sock.handshake["maxPayload"] + 1))
    assert big.status == 413
    # Packets nobody fetches pile up only so far: past the bound the session ends.
    assert sock.post("40").status == 200
    for _ in range(200):
        resp = sock.post('421["join",{"room":"workflow1"}]')
        if resp.status != 200:
            break
    assert resp.status == 400 and sock.get().status == 400


def test_at_most_1000_sessions(server):
    api = server.client()
    statuses = [api.get(PATH).status for _ in range(1001)]
    assert statuses.count(200) == 1000 and statuses[-1] == 503, statuses[-3:]


def follow_with_python_socketio(server, wid, schedule):
    """The real python-socketio client in polling mode, joined to workflow `wid`'s room: call `schedule`
    (it must answer True) and return the new-progress events received until finished-workflow."""
    socketio = pytest.importorskip("socketio")
    requests = pytest.importorskip("requests")
    received, finished = [], threading.Event()
    # python-engineio sends connect(headers=...) with the handshake only; every request needs the
    # token here, so its HTTP session carries it.
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + server.token
    client = socketio.Client(reconnection=False, http_session=session)
    client.on("new-progress", lambda data: received.append(data))
    client.on("finished-workflow", lambda data: finished.set())
    client.connect(server.url, headers={"Authorization": "Bearer " + server.token}, transports=["polling"])
    try:
        assert client.transport() == "polling"
        client.call("join", {"room": "workflow%d" % wid}, timeout=10)  # acknowledged once joined
        assert schedule() is True
        assert finished.wait(30), received
    finally:
        client.disconnect()
    return received


def test_python_socketio_client_in_polling_mode(stand):
    api = stand.client()
    wid = ready_workflow(api)
    stand.worker()
    received = follow_with_python_socketio(
        stand, wid, lambda: api.post("/api/workflows/%d/schedule" % wid).status == 200)
    assert received[-1] == {"submitted_processes": 2, "completed_processes": 2}
    assert "Traceback" not in stand.output()


def test_create_answers_the_workflow_at_the_top_level_too(api):
    """nf-cloud's UI reads the new workflow's `id` at the top level (issue 15, item 3)."""
    resp = api.post("/api/workflows/create", {"name": "from the UI"})
    assert resp.status == 200
    body = resp.json()
    assert body["id"] == body["workflow"]["id"] and body["name"] == "from the UI"
    assert {k: v for k, v in body.items() if k != "workflow"} == body["workflow"]
    assert api.get("/api/workflows/%d" % body["id"]).json()["workflow"] == body["workflow"]


def test_a_new_run_starts_at_zero_of_zero(stand):
    """Right after `schedule`, the workflow's counters are the new run's, not the last run's."""
    api = stand.client()
    wid = ready_workflow(api)
    worker = stand.worker()
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    done = wait_for(lambda: api.get("/api/workflows/%d" % wid).json()["workflow"]["status"] == "succeeded" and
                    api.get("/api/workflows/%d" % wid).json()["workflow"], timeout=30)
    assert (done["submitted_processes"], done["completed_processes"]) == (2, 2)
    worker.stop()  # the second run gets no task
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    for workflow in (api.get("/api/workflows/%d" % wid).json()["workflow"],
                     api.get("/api/workflows").json()["workflows"][0]):
        # (The stopped worker's claim may still be waiting in the server, and take the run.)
        assert workflow["status"] in ("queued", "running") and workflow["run"]["id"] != done["run"]["id"]
        assert (workflow["submitted_processes"], workflow["completed_processes"]) == (0, 0)

"""Notifications when a run ends: a webhook receiver and an SMTP sink started here get exactly one
message per finished run, whichever way the run ended, across a restart in the middle of the retries,
without ever holding up a request; the signature verifies."""

import email
import email.policy
import hashlib
import hmac
import json
import os
import signal
import socket
import threading

import pytest
from aiosmtpd.controller import Controller

from conftest import PostReceiver, ServerProcess, claim_and_confirm, report_finished, wait_for

SECRET = "webhook-secret"


class Receiver(PostReceiver):
    """A webhook receiver: records every POST and answers the statuses of `answers` in turn, then 200.
    While `hold` is clear it keeps each request waiting."""

    def __init__(self):
        self.requests = []  # (headers, body, status answered)
        self.arrived = 0
        self.answers = []
        self.hold = threading.Event()
        self.hold.set()
        super().__init__()
        self.url = "http://127.0.0.1:%d/hooks/T0001/B0002?key=chat-secret" % self.port

    def answer(self, path, headers, body):
        self.arrived += 1
        self.hold.wait(30)
        status = self.answers.pop(0) if self.answers else 200
        self.requests.append((headers, body, status))
        return status

    def for_run(self, run_id):
        return [r for r in self.requests if json.loads(r[1])["run"]["id"] == run_id]

    def close(self):
        self.hold.set()
        super().close()


class Sink:
    """An SMTP server that keeps each message; it answers 451 (try later) to the first `refuse` ones."""

    def __init__(self):
        self.messages = []
        self.refuse = 0
        self.refused = 0
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        if self.refuse:
            self.refuse -= 1
            self.refused += 1
            return "451 4.3.0 try again later"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              email.message_from_bytes(envelope.original_content)))
        return "250 OK"

    def for_run(self, run_id):
        return [m for m in self.messages if "run %d of workflow" % run_id in m[2]["Subject"]]

    def close(self):
        self.controller.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def write_config(tmp_path, notify, **pipelines):
    (tmp_path / "main.nf").write_text("workflow { }\n")
    config = {"lease_seconds": 2, "notify": notify,
              "nextflow_workflows": dict({"local": {"directory": str(tmp_path), "script": "main.nf"}}, **pipelines)}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def notify_both(receiver, sink, waits=(0.2,) * 4):
    return {"webhooks": [{"url": receiver.url, "secret": SECRET}], "retry_after_seconds": list(waits),
            "email": {"smtp": "127.0.0.1:%d" % sink.controller.port, "from": "nfapi@example.org",
                      "to": ["team@example.org"]}}


@pytest.fixture
def start(tmp_path):
    servers = []

    def start(config):
        srv = ServerProcess(tmp_path, config=config).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.stop()
        assert "Traceback" not in srv.output(), srv.output()


def scheduled(api, pipeline="local", notify_email=None, name="notified"):
    wid = api.create(name)
    body = {"nextflow_workflow": pipeline}
    if notify_email is not None:
        body["notify_email"] = notify_email
    assert api.post("/api/workflows/%d/update" % wid, body).status == 200
    assert api.post("/api/workflows/%d/schedule" % wid).status == 200
    return wid, api.get("/api/workflows/%d" % wid).json()["workflow"]["run"]["id"]


def notifications(api, wid, run_id):
    resp = api.get("/api/workflows/%d/runs/%d/notifications" % (wid, run_id))
    assert resp.status == 200, resp
    return {n["channel"]: n for n in resp.json()["notifications"]}


def delivered(api, wid, run_id, channels=("webhook", "email")):
    """Wait until every channel of the run is sent, then return its notifications."""
    def done():
        found = notifications(api, wid, run_id)
        return found if sorted(found) == sorted(channels) and all(
            n["status"] == "sent" for n in found.values()) else None
    return wait_for(done, timeout=15, message="notifications of run %d" % run_id)


def signature_verifies(headers, body):
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Nfapi-Signature"], expected)


def test_every_way_a_run_ends_notifies_exactly_once(tmp_path, start, receiver, sink):
    """Finished by its worker, cancelled while queued, lost by its worker, failed at claim because its
    pipeline left the configuration: one webhook POST and one e-mail each."""
    config = write_config(tmp_path, notify_both(receiver, sink), gone={"directory": str(tmp_path), "script": "main.nf"})
    srv = start(config)
    api = srv.client()
    finished_wf, finished = scheduled(api, notify_email=["ada@example.org", "team@example.org"])
    launch = claim_and_confirm(api)
    report_finished(api, launch, exit_code=1)
    cancelled_wf, cancelled = scheduled(api)
    assert api.post("/api/workflows/%d/cancel" % cancelled_wf).status == 200
    lost_wf, lost = scheduled(api)
    claim_and_confirm(api)  # and no heartbeat after: the lease (2 s) runs out
    gone_wf, gone = scheduled(api, pipeline="gone")
    wait_for(lambda: api.get("/api/workflows/%d" % lost_wf).json()["workflow"]["status"] == "lost", timeout=15)
    srv.stop()
    srv.config = write_config(tmp_path, notify_both(receiver, sink))
    srv.start()
    api = srv.client()
    assert api.post("/api/worker/claim", {"worker": "test", "wait": 0}).json()["run"] is None

    expected = {finished: (finished_wf, "failed"), cancelled: (cancelled_wf, "cancelled"), lost: (lost_wf, "lost"),
                gone: (gone_wf, "failed")}
    for run_id, (wid, status) in expected.items():
        found = delivered(api, wid, run_id)
        assert found["webhook"]["attempts"] == found["email"]["attempts"] == 1  # so nothing more will come
        assert found["webhook"]["target"] == "http://127.0.0.1:%d/..." % receiver.port
        [(headers, body, _)] = receiver.for_run(run_id)
        assert signature_verifies(headers, body) and headers["X-Nfapi-Delivery"] == str(found["webhook"]["id"])
        message = json.loads(body)
        assert message["event"] == "run.finished" and message["workflow"]["id"] == wid
        assert message["run"]["status"] == status
        assert message["text"].startswith('nfapi: run %d of workflow %d "notified" %s' % (run_id, wid, status))
        [(sender, recipients, mail)] = sink.for_run(run_id)
        assert sender == "nfapi@example.org" and mail["Auto-Submitted"] == "auto-generated"
        assert recipients == (["team@example.org", "ada@example.org"] if run_id == finished else ["team@example.org"])
        assert found["email"]["target"] == ", ".join(recipients)
        assert "Run:       %d, %s" % (run_id, status) in mail.get_payload()
    assert len(receiver.requests) == len(sink.messages) == 4
    assert "no longer configured" in json.loads(receiver.for_run(gone)[0][1])["run"]["error_message"]


def test_a_restart_in_the_middle_of_the_retries_neither_loses_nor_repeats(tmp_path, start, receiver, sink):
    """The receiver answers 500 and the SMTP server 451 to the first attempt; the server is killed
    before the second, started again, and both then succeed: one message each, two attempts."""
    receiver.answers = [500]
    sink.refuse = 1
    srv = start(write_config(tmp_path, notify_both(receiver, sink, waits=(5,) * 4)))
    api = srv.client()
    wid, run_id = scheduled(api)
    report_finished(api, claim_and_confirm(api))

    def first_attempt_failed():
        found = notifications(api, wid, run_id)
        return len(found) == 2 and all(n["attempts"] == 1 and n["last_error"] for n in found.values())
    wait_for(first_attempt_failed, timeout=10, message="the first attempts to fail")
    srv.stop(signal.SIGKILL)
    assert len(receiver.requests) == 1 and not sink.messages  # killed before the second attempts
    srv.start()
    api = srv.client()
    found = delivered(api, wid, run_id)
    assert found["webhook"]["attempts"] == found["email"]["attempts"] == 2
    assert found["webhook"]["last_error"] == "the webhook answered HTTP 500"
    assert found["email"]["last_error"] == "the SMTP server answered 451 4.3.0 try again later"
    assert [status for _, _, status in receiver.requests] == [500, 200]
    assert receiver.requests[0][1] == receiver.requests[1][1]  # the same delivery, the same body
    assert all(signature_verifies(headers, body) for headers, body, _ in receiver.requests)
    assert len(sink.messages) == 1 and sink.refused == 1


def test_a_receiver_that_hangs_holds_up_no_request(tmp_path, start, receiver, sink):
    receiver.hold.clear()
    srv = start(write_config(tmp_path, notify_both(receiver, sink)))
    api = srv.client()
    wid, run_id = scheduled(api)
    report_finished(api, claim_and_confirm(api))
    wait_for(lambda: receiver.arrived == 1, message="the webhook to be posted")
    # The receiver still holds that POST: the server answers, queues and ends other runs meanwhile.
    other_wid, other = scheduled(api)
    report_finished(api, claim_and_confirm(api))
    assert api.get("/api/workflows/%d" % other_wid).json()["workflow"]["status"] == "succeeded"
    assert receiver.requests == []
    receiver.hold.set()
    delivered(api, wid, run_id)
    delivered(api, other_wid, other)
    assert len(receiver.requests) == len(sink.messages) == 2


def test_gives_up_after_the_last_retry_and_sendmail_gets_a_fixed_command_line(tmp_path, start, receiver):
    receiver.answers = [500] * 10
    record = tmp_path / "sendmail"
    record.mkdir()
    sendmail = tmp_path / "fake-sendmail"
    sendmail.write_text('#!/bin/sh\nprintf "%%s\\n" "$@" > %s/argv\ncat > %s/message\n' % (record, record))
    sendmail.chmod(0o755)
    srv = start(write_config(tmp_path, {
        "webhooks": [{"url": receiver.url, "secret": SECRET}], "retry_after_seconds": [0.1, 0.1],
        "email": {"sendmail": str(sendmail), "from": "nfapi@example.org", "to": ["team@example.org"]}}))
    api = srv.client()
    # sendmail -t takes its recipients from the headers: a line break in the name must not add one.
    wid, run_id = scheduled(api, notify_email=["ada@example.org"], name="évaluation\r\nBcc: eve@example.org")
    report_finished(api, claim_and_confirm(api))
    wait_for(lambda: notifications(api, wid, run_id)["webhook"]["status"] == "failed", timeout=10)
    found = notifications(api, wid, run_id)
    assert found["webhook"]["attempts"] == 3 and len(receiver.requests) == 3  # one try, then one per wait
    assert found["webhook"]["next_at"] is None and found["email"]["status"] == "sent"
    assert (record / "argv").read_text().split() == ["-t", "-oi"]
    mail = email.message_from_bytes((record / "message").read_bytes(), policy=email.policy.default)
    assert mail["To"] == "team@example.org, ada@example.org" and mail["From"] == "nfapi@example.org"
    assert mail["Bcc"] is None and "eve@" not in mail["To"]
    assert mail["Subject"].startswith('[nfapi] run %d of workflow %d "évaluation Bcc: eve@example.org" succeeded after'
                                      % (run_id, wid))


def test_a_workflows_own_recipients(tmp_path, start, sink):
    srv = start(write_config(tmp_path, {"email": {"smtp": "127.0.0.1:%d" % sink.controller.port,
                                                  "from": "nfapi@example.org"}}))
    api = srv.client()
    wid = api.create("mine")
    for bad in (["not an address"], "ada@example.org", ["ada@example.org\r\nBcc: eve@example.org"],
                ["x%d@example.org" % i for i in range(21)]):
        resp = api.post("/api/workflows/%d/update" % wid, {"notify_email": bad})
        assert resp.status == 422 and "notify_email" in resp.json()["errors"], bad
    assert api.post("/api/workflows/%d/update" % wid, {"notify_email": ["ada@example.org"]}).status == 200
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["notify_email"] == ["ada@example.org"]
    assert api.post("/api/workflows/%d/update" % wid, {"notify_email": []}).status == 200
    assert api.get("/api/workflows/%d" % wid).json()["workflow"]["notify_email"] == []


def test_recipients_need_a_server_that_sends_email(api):
    wid = api.create("x")
    resp = api.post("/api/workflows/%d/update" % wid, {"notify_email": ["ada@example.org"]})
    assert resp.status == 422 and "notify.email" in resp.json()["errors"]["notify_email"][0]


@pytest.mark.parametrize("notify, where, what", [
    ({"webhooks": [{"url": "ftp://example.org/x", "secret": "s"}]}, "notify.webhooks.0.url", "http:// or https://"),
    ({"webhooks": [{"url": "https://u:p@example.org/x", "secret": "s"}]}, "notify.webhooks.0.url", "URL"),
    ({"webhooks": [{"url": "https://example.org/x"}]}, "notify.webhooks.0.secret", "HMAC-SHA256"),
    ({"webhooks": [{"url": "https://example.org/x", "secret": "s"}] * 2}, "notify.webhooks", "twice"),
    ({"email": {"smtp": "localhost:25", "sendmail": "/usr/sbin/sendmail", "from": "a@b.org"}}, "notify.email",
     "not both"),
    ({"email": {"smtp": "localhost", "from": "a@b.org"}}, "notify.email.smtp", "host:port"),
    ({"email": {"sendmail": "sendmail", "from": "a@b.org"}}, "notify.email.sendmail", "absolute path"),
    ({"email": {"smtp": "localhost:25", "from": "a@b.org", "to": ["Ada <a@b.org>"]}}, "notify.email.to",
     "e-mail addresses"),
    ({"email": {"smtp": "localhost:25"}}, "notify.email.from", "e-mail address"),
    ({"retry_after_seconds": []}, "notify.retry_after_seconds", "waits in seconds"),
    ({"slack": {}}, "notify.slack", "unknown key"),
])
def test_notify_configuration_errors_name_the_key(tmp_path, notify, where, what):
    import nfapi
    with pytest.raises(nfapi.ConfigError) as err:
        nfapi.load_config(write_config(tmp_path, notify))
    assert str(err.value).startswith(where + ":") and what in str(err.value), str(err.value)

"""Issue 11 finding 6: a multipart body may hold one file and a few known fields, and parsing it
costs time in proportion to its size, whatever the size of its parts."""

import socket
import time

import nfapi
from conftest import multipart_body

BOUNDARY = "XbOuNdArY"


def tiny_parts(count, name=lambda i: "f%d" % i):
    return multipart_body([(name(i), None, b"x") for i in range(count)], BOUNDARY)[0]


def send_body(server, wid, body, content_type):
    """POST `body` as an upload on a raw socket; the answer's status line, even when the server answers
    before the body is all sent (it then stops reading, and the rest of the body is not needed)."""
    head = ("POST /api/workflows/%d/upload-file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (wid, server.token, content_type, len(body))).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        try:
            sock.sendall(head)
            view = memoryview(body)
            for start in range(0, len(body), 1 << 20):
                sock.sendall(view[start:start + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n")[0]


def test_parsing_is_linear_in_the_body_size():
    """4 MB of 50-byte parts in one chunk: the parser used to copy the rest of its buffer per part."""
    body = tiny_parts(4 * 1024 * 1024 // 50)
    parser = nfapi.MultipartParser(BOUNDARY.encode())
    started = time.process_time()
    events = parser.feed(body)
    parser.close()
    spent = time.process_time() - started
    print("parsed %d parts (%d bytes in one chunk) in %.2f s of CPU" % (len(events) // 3, len(body), spent))
    assert len(events) // 3 > 80000
    assert spent < 5  # measured 0.3 s; copying the buffer per part took minutes


def test_unknown_and_repeated_fields_are_refused(api, server):
    wid = api.create("fields")
    url = "/api/workflows/%d/upload-file" % wid
    for parts, field in [([("note", None, b"hi"), ("file", "a.txt", b"a")], "note"),
                         ([("file", "a.txt", b"a"), ("extra", "b.txt", b"b")], "extra"),
                         ([("directory", None, b"a"), ("directory", None, b"b"), ("file", "a.txt", b"a")], "directory"),
                         ([("directory", None, b"d" * (nfapi.MAX_FORM_FIELD_BYTES + 1)), ("file", "a.txt", b"a")],
                          "directory")]:
        body, ctype = multipart_body(parts)
        resp = api.post(url, body, headers={"Content-Type": ctype})
        assert resp.status in (413, 422) and list(resp.json()["errors"]) == [field], (field, resp)
    assert api.get("/api/workflows/%d/files" % wid).json() == {"folders": [], "files": []}


def test_8mb_of_tiny_parts_is_refused_cheaply(api, server):
    wid = api.create("tiny")
    body = tiny_parts(8 * 1024 * 1024 // 50, name=lambda i: "directory")
    before = server.cpu_seconds()
    status = send_body(server, wid, body, "multipart/form-data; boundary=" + BOUNDARY)
    spent = server.cpu_seconds() - before
    print("8 MB of 50-byte parts: %r, %.2f s of server CPU" % (status, spent))
    assert status.startswith(b"HTTP/1.1 4"), status
    assert spent < 2  # loosely: it took 6 s when every part was parsed and its buffer copied


def test_150mb_of_text_fields_keeps_memory_flat(api, server):
    wid = api.create("fields")
    api.upload(wid, "warmup", b"w")
    field = b"t" * (60 * 1024)
    body = multipart_body([("field%d" % i, None, field) for i in range(2500)], BOUNDARY)[0]
    before = server.vm_hwm_kb()
    status = send_body(server, wid, body, "multipart/form-data; boundary=" + BOUNDARY)
    growth_mb = (server.vm_hwm_kb() - before) / 1024
    print("%d MB of 60 KB text fields: %r, server peak memory growth %.1f MB" % (len(body) >> 20, status, growth_mb))
    assert status.startswith(b"HTTP/1.1 4"), status
    assert growth_mb < 20

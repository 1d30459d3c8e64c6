"""Issue 11, finding 4: once an answer's status line has gone out, a failure aborts the connection;
it never writes a second response into the body."""

import os
import socket

from conftest import wait_for

BIG_FILE = 24 * 1024 * 1024  # more than loopback's socket buffers hold, so the server is mid-stream


def start_download(server, path, fmt):
    """A keep-alive download whose head and first bytes are read; the rest waits in the socket."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(("GET %s&format=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
                  % (path, fmt, server.token)).encode())
    data = b""
    while b"\r\n\r\n" not in data or len(data) < 65536:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head, head
    return sock, body


def read_to_end(sock, body):
    """Everything the server sends after `body`, and whether it closed the connection (it must not
    leave it open after a broken answer: a timeout here fails the test)."""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return body, True
        if not chunk:
            return body, True
        body += chunk
        if body.endswith(b"\r\n0\r\n\r\n") and complete_chunked(body):
            return body, False


def complete_chunked(body):
    """Whether `body` is a whole chunked transfer, ending with its last (zero) chunk."""
    offset = 0
    while True:
        line_end = body.find(b"\r\n", offset)
        if line_end < 0:
            return False
        try:
            size = int(body[offset:line_end], 16)
        except ValueError:
            return False
        if size == 0:
            return body[line_end:] == b"\r\n\r\n"
        offset = line_end + 2 + size + 2
        if offset > len(body):
            return False


def fill(folder, files, size):
    os.makedirs(folder)
    for i in range(files):
        with open(os.path.join(folder, "f%03d.bin" % i), "wb") as f:
            f.write(os.urandom(size))


def test_a_folder_deleted_while_its_zip_streams_aborts_the_connection(api, server):
    wid = api.create("deleted mid-stream")
    fill(os.path.join(server.data, "workflows", str(wid), "big"), 96, BIG_FILE // 96)
    sock, body = start_download(server, "/api/workflows/%d/download?path=big" % wid, "zip")
    assert api.post("/api/workflows/%d/delete-path" % wid, {"path": "big"}).status == 200
    body, closed = read_to_end(sock, body)
    sock.close()
    assert b"HTTP/1.1" not in body
    complete = complete_chunked(body)
    assert complete or closed
    print("zip after delete-path: %s, %d bytes" % ("complete" if complete else "aborted", len(body)))
    if not complete:
        wait_for(lambda: "nfapi: aborted GET /api/workflows/%d/download" % wid in server.output(),
                 message="the abort to be logged")


def test_a_file_that_shrinks_while_its_tar_streams_aborts_the_connection(api, server):
    # A tar header gives the file's size before its content: once the file is shorter than that,
    # the answer cannot be completed.
    wid = api.create("shrinks mid-stream")
    folder = os.path.join(server.data, "workflows", str(wid), "big")
    fill(folder, 1, BIG_FILE)
    sock, body = start_download(server, "/api/workflows/%d/download?path=big" % wid, "tar.gz")
    os.truncate(os.path.join(folder, "f000.bin"), 1000)
    body, closed = read_to_end(sock, body)
    sock.close()
    assert b"HTTP/1.1" not in body
    assert closed and not complete_chunked(body)
    wait_for(lambda: "nfapi: aborted GET /api/workflows/%d/download?path=big&format=tar.gz HTTP/1.1: " % wid in server.output(),
             message="the abort to be logged")
    # The server goes on serving.
    assert api.get("/api/workflows/count").json() == {"count": 1}

"""A fault-injecting S3 endpoint for tests: an HTTP proxy on 127.0.0.1 in front of the moto server
that answers chosen requests with throttling, server errors, access denied or a stalled response,
and forwards the rest unchanged.

A fault applies to requests whose path contains ``match`` (``/bucket/key``: pyarrow and boto3
address buckets by path with an endpoint override), for the first ``times`` of them per path
(None: all of them). Counting per path, not per proxy, makes the tests deterministic whatever
order the client's threads send their requests in.
"""
from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

# S3's own answers for these faults (https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html).
_ANSWERS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
    "expired": (403, "ExpiredToken", "The provided token has expired."),
}


@dataclass
class Fault:
    """``kind``: one of slowdown, internal, denied, expired, or stall (hold the request without an
    answer for ``FaultStore.stall_s`` seconds, then drop the connection)."""

    match: str
    kind: str
    times: int | None = None
    method: str | None = None  # GET, HEAD, ...: only requests of this method; None: any
    hits: dict[str, int] = field(default_factory=dict)

    def applies(self, method: str, path: str) -> bool:
        if self.match not in path or self.method not in (None, method):
            return False
        self.hits[path] = self.hits.get(path, 0) + 1
        return self.times is None or self.hits[path] <= self.times


class FaultStore:
    """``with FaultStore(upstream) as store:`` serves on ``store.endpoint``; ``store.faults`` may be
    changed while it runs. Stops itself after ``lifetime_s`` whatever the test does."""

    def __init__(self, upstream: str, stall_s: float = 3.0, lifetime_s: float = 600.0) -> None:
        self.upstream = urlparse(upstream).netloc
        self.stall_s = stall_s
        self.faults: list[Fault] = []
        self.served: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> FaultStore:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    def faulted(self, kind: str | None = None) -> list[str]:
        """Paths of the requests answered with a fault (of ``kind``), in order."""
        with self._lock:
            return [path for _, path, what in self.served if what != "forwarded" and kind in (None, what)]

    def _fault_for(self, method: str, path: str) -> str | None:
        with self._lock:
            for fault in self.faults:
                if fault.applies(method, path):
                    return fault.kind
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def _any(self) -> None:
                body = self._body()
                path = unquote(urlparse(self.path).path)
                kind = store._fault_for(self.command, path)
                with store._lock:
                    store.served.append((self.command, path, kind or "forwarded"))
                if kind == "stall":
                    store._stopped.wait(store.stall_s)
                    self.close_connection = True
                    return
                if kind is not None:
                    self._answer(*_ANSWERS[kind])
                    return
                self._forward(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                # pyarrow streams uploads in HTTP chunks: forwarded whole, with a Content-Length.
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                del self.headers["Transfer-Encoding"]
                self.headers["Content-Length"] = str(sum(map(len, chunks)))
                return b"".join(chunks)

            def _answer(self, status: int, code: str, message: str) -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-amz-request-id", "fault")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(store.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(name, value)
                # HEAD answers carry the object's length with no body: pass it on unchanged.
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        return Handler


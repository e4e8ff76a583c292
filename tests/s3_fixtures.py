"""A real S3 API on loopback for tests and benchmarks: moto's server, s3fs pointed at it, and
a fault-injecting HTTP proxy in front of it. Nothing here needs the internet.

- :class:`MotoS3`: ``moto.server.ThreadedMotoServer`` on 127.0.0.1 at a free port, with
  :meth:`MotoS3.storage_options` for s3fs and :meth:`MotoS3.upload` to put a local dataset
  directory into a bucket.
- :class:`FaultProxy`: a threaded HTTP proxy in front of the server that adds a fixed
  latency to every request and fails a share of them (HTTP 503, a dropped connection, or a
  response body cut short), seeded; it counts the GETs per object key.

Load the pytest fixtures with ``pytest_plugins = ["s3_fixtures"]`` in a test module.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

KEY = "testing"  # moto accepts any credentials; these never reach a manifest or a log


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storage_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for an S3 API at ``endpoint`` (no instance caching: each test's
    filesystem sees its own endpoint)."""
    return {
        "key": KEY,
        "secret": KEY,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


class MotoS3:
    """moto's S3 server on loopback."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        """The server's URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start serving (returns once the server answers)."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def storage_options(self) -> dict[str, Any]:
        """s3fs options talking to this server directly."""
        return storage_options(self.endpoint)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=KEY, aws_secret_access_key=KEY)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default); returns its name."""
        name = name or f"scmf-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, directory: Path, url: str) -> str:
        """Put every file under ``directory`` at ``url`` (``s3://bucket/prefix``)."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = self.client()
        for f in sorted(Path(directory).rglob("*")):
            if f.is_file():
                key = "/".join(p for p in (prefix, f.relative_to(directory).as_posix()) if p)
                client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
        return url

    def put(self, url: str, data: bytes) -> None:
        """Overwrite one object."""
        bucket, _, key = url[len("s3://"):].partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, url: str) -> bytes:
        """Read one object."""
        bucket, _, key = url[len("s3://"):].partition("/")
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def _request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The body of the request ``handler`` is serving (plain or chunked)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            chunk = handler.rfile.read(size + 2)[:size]
            if not size:
                break
            parts.append(chunk)
        return b"".join(parts)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


class FaultProxy:
    """An HTTP proxy on loopback in front of ``upstream`` (host, port): every request waits
    ``delay_s`` first; a share ``fail_rate`` of them fails (alternately a 503 SlowDown, a
    dropped connection, and a GET body cut short), drawn from ``seed``. ``gets`` counts the
    successful GETs per path."""

    def __init__(self, upstream_port: int, *, delay_s: float = 0.0, fail_rate: float = 0.0, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.fail_rate = fail_rate
        self.gets: Counter[str] = Counter()
        self.failures = 0
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The proxy's URL (point s3fs here)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        """Start serving in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> int:
        """0: pass the request through; 1, 2, 3: fail it one of three ways."""
        with self._lock:
            self.requests += 1
            if self.fail_rate <= 0 or self._rng.random() >= self.fail_rate:
                return 0
            self.failures += 1
            return 1 + self.failures % 3

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
                pass

            def _relay(self) -> None:
                body = _request_body(self)
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                fault = proxy._fault()
                if fault == 1:
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == 2:
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body: its Content-Length is the object's size, kept
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == 3 and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)
                if self.command == "GET" and resp.status == 200:
                    with proxy._lock:
                        proxy.gets[self.path.split("?")[0]] += 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay  # noqa: N815

        return Handler


# ---- pytest fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """One moto S3 server for the session."""
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy(s3_server: MotoS3) -> Iterator[FaultProxy]:
    """A proxy in front of the session's server (no faults until configured)."""
    proxy = FaultProxy(s3_server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()

"""A real S3-compatible server (moto's) on 127.0.0.1, for the tests and benchmarks of the object-store path.

It is a separate process speaking the S3 REST protocol, so boto3, s3fs, delta-rs and DVC all talk to
it over HTTP exactly as they would to S3 or MinIO; nothing in-process is patched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# moto accepts any credentials; these are deliberately fake and recognisable in a leak check.
TEST_ACCESS_KEY = "AKIAHAPTESTKEY000001"
TEST_SECRET_KEY = "hap-test-secret-do-not-log-0000000000000"
TEST_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The variables every S3 client here reads (boto3, s3fs, delta-rs, DVC's s3 remote)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_REGION": TEST_REGION,
            "AWS_ALLOW_HTTP": "true",  # delta-rs refuses plain http unless told
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            region_name=TEST_REGION,
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` and return its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(startup_timeout: float = 30.0) -> Iterator[S3Server]:
    """Start ``moto.server`` on a free 127.0.0.1 port, wait until it answers, stop it on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    server = S3Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                server.client().list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto S3 server on port {port} did not start") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class HangingProxy:
    """A TCP proxy in front of the S3 server that can be made to hang: ``hang()`` keeps accepting
    connections and reading requests but stops answering (live connections stall mid-response),
    as a store whose load balancer is up and whose backends are stuck; ``resume()`` forwards again.
    The store's state is untouched, so a re-run after ``resume()`` sees everything."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._answering = threading.Event()
        self._answering.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self._answering.clear()

    def resume(self) -> None:
        self._answering.set()

    def close(self) -> None:
        self._closed = True
        self._answering.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._answering.wait()  # a hung store accepts, and never connects the request through
        try:
            upstream = socket.create_connection(self._target)
        except OSError:
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._answering.wait()  # a response in flight stalls too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

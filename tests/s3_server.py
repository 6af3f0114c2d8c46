"""A real S3-compatible server (moto's) on 127.0.0.1, for the tests and benchmarks of the object-store path.

It is a separate process speaking the S3 REST protocol, so boto3, s3fs, delta-rs and DVC all talk to
it over HTTP exactly as they would to S3 or MinIO; nothing in-process is patched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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

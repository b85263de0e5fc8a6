"""Session-wide test set-up: no test ever sees the developer's AWS configuration, and tests that need
object storage get a real S3-compatible server (moto's standalone server) on 127.0.0.1.

    .venv/bin/python -m pytest -q tests/integration/test_storage.py
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

from data_pipeline.storage import StorageOptions

# every credential source botocore consults, set or emptied for the session so that a developer's
# ~/.aws, profile or endpoint override can neither leak into nor change a test
_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    # never send 127.0.0.1 traffic through a proxy from the environment
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
_CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "FSSPEC_S3_ENDPOINT_URL",
)

_START_TIMEOUT_S = 30.0


@pytest.fixture
def bench_script() -> Callable[[str], ModuleType]:
    """Imports a script of bench/ by name (``bench_script("quality")``); the scripts import their
    neighbours (``from trunk import ...``), so bench/ is on sys.path while the script is imported."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

    def load(name: str) -> ModuleType:
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)

    return load


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_env() -> Iterator[None]:
    """Dummy AWS credentials and no AWS config files for the whole session; restored afterwards."""
    saved = {name: os.environ.get(name) for name in (*_TEST_ENV, *_CLEARED_ENV)}
    os.environ.update(_TEST_ENV)
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _fmrl_logger_restored() -> Iterator[None]:
    """The ``fmrl`` logger as it was before each test: ``fmrl``'s main() (called in-process by tests)
    gives it a terminal handler of its own and stops its propagation, which would hide its records from
    a later test's caplog."""
    import logging

    logger = logging.getLogger("fmrl")
    saved = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _free_port() -> int:
    # the port may be taken again between here and the server's bind; start() then fails loudly
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server subprocess on 127.0.0.1. Its state is in memory: a restart empties it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.options = StorageOptions(
            endpoint_url=self.endpoint_url, key="testing", secret="testing", region="us-east-1"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def start(self) -> None:
        """Start (or restart) the server on the same port and wait until it answers."""
        if self._process is not None and self._process.poll() is None:
            return
        command = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self._process = subprocess.Popen(
            [command, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # a direct opener: proxies from the environment must not see this request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with code {self._process.returncode} on port {self.port}:\n"
                    + self._output()
                )
            try:
                opener.open(self.endpoint_url + "/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"moto_server did not answer at {self.endpoint_url} within {_START_TIMEOUT_S:.0f} s:\n"
                    + self._output()
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (for fault tests); requests then fail with connection refused."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are still accepted by the kernel, but nothing is
        answered, as with a hung server."""
        assert self._process is not None and self._process.poll() is None
        os.kill(self._process.pid, signal.SIGSTOP)

    def unpause(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one if no name is given) and return ``"s3://name"``."""
        from data_pipeline.storage import filesystem

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        fs, _ = filesystem(f"s3://{name}", self.options)
        # not fs.mkdir: s3fs sends LocationConstraint=us-east-1, which S3 (and moto) reject
        fs.call_s3("create_bucket", Bucket=name)
        return f"s3://{name}"

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def s3_server(_isolated_aws_env: None) -> Iterator[S3Server]:
    """A running moto S3 server for the session; see :class:`S3Server`."""
    server = S3Server(_free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server._log.close()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small synthetic dataset with its frozen features, made once per session by the real pipeline:
    prepare_synthetic (text + PNG images in shards) -> extract_features (MiniLM text, EfficientNet-Lite0
    images at 32 px to keep it quick). 150 items, 200 users, 4 user shards; returns its path."""
    import torch

    from data_pipeline.features import extract_features
    from data_pipeline.synthetic_shards import prepare_synthetic

    path = str(tmp_path_factory.mktemp("tiny") / "data")
    prepare_synthetic(
        path,
        num_items=150,
        num_users=200,
        num_clusters=10,
        min_seq_len=5,
        max_seq_len=12,
        seed=0,
        max_samples_per_shard=50,
        image_size=32,
        progress=False,
    )
    threads = torch.get_num_threads()
    try:
        extract_features(path, image_size=32, chunk_size=64, progress=False)
    finally:
        torch.set_num_threads(threads)
    return path

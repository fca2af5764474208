"""An S3-compatible server on loopback for the embedded default.

It runs moto's own HTTP server (the ``moto_server`` command, started as
``python -m moto.server`` with this interpreter) in a separate process, so the
pipeline reaches it through real boto3 HTTP calls exactly as it would reach S3.
State lives in that process's memory and is gone once it stops.

    with LocalS3Server() as s3:
        os.environ.update(s3.env())
        ...  # boto3 clients now talk to s3.endpoint_url
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

# moto accepts any credentials; these are the values its documentation uses.
DUMMY_CREDENTIAL = "testing"
REGION = "us-east-1"


class LocalS3ServerError(RuntimeError):
    """The local S3 server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalS3Server:
    """moto's S3 server in a child process on ``host:port`` (a free port when ``port`` is None)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30.0):
        self.host = host
        self._requested_port = port
        self.port: int | None = port
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise LocalS3ServerError("LocalS3Server has no port yet: call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalS3Server:
        """Start the server and return once it answers HTTP; raise LocalS3ServerError otherwise."""
        if self.is_running():
            return self
        # A port picked here can be taken by someone else before the child binds it,
        # so a free port that turns out busy is retried with another one.
        attempts = 1 if self._requested_port is not None else 3
        last_error: LocalS3ServerError | None = None
        for _ in range(attempts):
            self.port = self._requested_port or free_port(self.host)
            try:
                self._spawn()
                self._wait_until_ready()
            except LocalS3ServerError as error:
                last_error = error
                self.stop()
                continue
            atexit.register(self.stop)
            logger.info("local S3 server (moto, pid %d) listening on %s", self.pid, self.endpoint_url)
            return self
        assert last_error is not None
        raise last_error

    def _spawn(self) -> None:
        log_fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
        self._log_path = Path(log_name)
        child_env = {**os.environ, "MOTO_PORT": str(self.port)}
        with os.fdopen(log_fd, "wb") as log_file:
            # Output goes to a file, not a pipe: moto logs every request, and a pipe
            # nobody reads would eventually block the server.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "--host", self.host, "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
            )

    def _log_tail(self, max_chars: int = 2000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-max_chars:]

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LocalS3ServerError(
                    f"moto server on {self.endpoint_url} exited with code {self._process.returncode} "
                    f"before answering:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer, even an error status, means the server is up
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise LocalS3ServerError(
            f"moto server on {self.endpoint_url} did not answer within {self.startup_timeout:.0f} s:\n"
            f"{self._log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server process and wait for it; safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            logger.info("local S3 server on %s:%s stopped", self.host, self.port)
        atexit.unregister(self.stop)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def env(self) -> dict[str, str]:
        """Standard AWS variables that point boto3 (and anything built on it) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIAL,
            "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIAL,
            "AWS_DEFAULT_REGION": REGION,
        }

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"LocalS3Server({self.host}:{self.port}, {state})"

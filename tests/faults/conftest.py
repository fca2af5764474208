"""Fault injection on loopback: a TCP proxy that takes a real server away and brings it back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.io.s3_server import free_port
from tasks.local.stack import MLFLOW_SERVER_ENVIRONMENT


class FaultyProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` in front of a real server.

    :meth:`down` makes the server unreachable as a dead host or a network cut would:
    new connections are refused and open ones are cut. :meth:`up` brings it back on
    the same port; the server behind it, and its state, never went away.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0
        self._cut: tuple[bytes, float] | None = None
        self.cuts = 0
        self.connections_at_cut: int | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            for sock in list(self._open):
                _close(sock)
            self._open.clear()

    def cut_on(self, request_bytes: bytes, back_after_s: float) -> None:
        """The next request whose bytes contain ``request_bytes`` is not forwarded: the proxy goes
        :meth:`down` as it arrives, cutting every open connection, and comes back ``back_after_s``
        later. A cut in the middle of an operation, wherever a poll loop would land."""
        self._cut = (request_bytes, back_after_s)

    def _maybe_cut(self, data: bytes) -> bool:
        cut = self._cut
        if cut is None or cut[0] not in data:
            return False
        self._cut = None
        self.cuts += 1
        self.connections_at_cut = self.connections
        self.down()
        threading.Timer(cut[1], self.up).start()
        return True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down() closed the listener
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._open.update((client, upstream))
                self.connections += 1
            for source, sink, inspect in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(source, sink, inspect), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, inspect: bool) -> None:
        try:
            while data := source.recv(65536):
                if inspect and self._maybe_cut(data):
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
                with self._lock:
                    self._open.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    except OSError:
        pass
    sock.close()


@pytest.fixture
def faulty_proxy():
    """``faulty_proxy(port)``: a proxy in front of ``127.0.0.1:port``, taken down at the test's end."""
    proxies: list[FaultyProxy] = []

    def start(port: int) -> FaultyProxy:
        proxies.append(FaultyProxy(port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.down()


class MlflowServer:
    """``mlflow server`` on loopback with a SQLite backend and local artifacts under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("w")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", str(self.root / "artifacts")],
            env={**MLFLOW_SERVER_ENVIRONMENT, **os.environ}, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server on loopback for one test."""
    with MlflowServer(tmp_path / "mlflow-server") as server:
        yield server

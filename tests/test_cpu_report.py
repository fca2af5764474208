"""``--cpu-report`` (tests/cpu_report.py) charges each test group the CPU time its tests' process tree
used while they ran: subprocesses they waited for, and servers of a session fixture while they
work; in one process and under pytest-xdist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

BUSY = '''
import subprocess
import sys

import pytest

BURN = "import time\\nend = time.process_time() + 1.5\\nwhile time.process_time() < end: pass"


@pytest.fixture(scope="module")
def busy_child():
    subprocess.run([sys.executable, "-c", BURN], check=True)  # in the first test's setup


@pytest.mark.xdist_group("busy")
def test_one(busy_child):
    pass


@pytest.mark.xdist_group("busy")
def test_two(busy_child):
    pass
'''

IDLE = '''
import time

import pytest


@pytest.mark.xdist_group("idle")
def test_sleeps():
    time.sleep(1.5)
'''

# A server of a session fixture: it works during the test that uses it (the first to run), and it
# is stopped only when the session ends, after the last test (test_idle.py's).
SERVER_CONFTEST = '''
import subprocess
import sys

import pytest

SERVE = (
    "import pathlib, sys, time\\n"
    "end = time.process_time() + 1.5\\n"
    "while time.process_time() < end: pass\\n"
    "pathlib.Path(sys.argv[1]).touch()\\n"
    "time.sleep(600)\\n"
)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    done = tmp_path_factory.mktemp("server") / "done"
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(done)])
    yield done
    process.kill()
    process.wait()
'''

SERVER = '''
import time

import pytest


@pytest.mark.xdist_group("server")
def test_served(server):
    deadline = time.monotonic() + 120
    while not server.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.exists()
'''

ROW = re.compile(r"^ *(?P<cpu>[\d.]+) CPU-s +(?P<wall>[\d.]+) s wall +(?P<group>\S+) \((?P<tests>\d+) tests?\)$")


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pytester.makeconftest(SERVER_CONFTEST)
    pytester.makepyfile(test_a_server=SERVER, test_busy=BUSY, test_idle=IDLE)
    return pytester


def groups(result) -> dict[str, dict]:
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "CPU time by test group" in line)
    rows = {}
    for line in lines[start + 1:]:
        match = ROW.match(line)
        if not match:
            break
        rows[match["group"]] = {"cpu": float(match["cpu"]), "wall": float(match["wall"]), "tests": int(match["tests"])}
    assert re.match(r"^ *[\d.]+ CPU-s in all$", lines[start + 1 + len(rows)])
    return rows


@pytest.mark.parametrize("xdist", [[], ["-n", "2", "--dist", "loadgroup"]], ids=["one process", "xdist"])
def test_a_group_is_charged_the_cpu_of_the_children_its_tests_waited_for(suite, xdist):
    result = suite.runpytest_subprocess("-p", "cpu_report", "--cpu-report", "0", *xdist)

    result.assert_outcomes(passed=4)
    rows = groups(result)
    server, busy, idle = ("server", "busy", "idle") if xdist else ("test_a_server.py", "test_busy.py", "test_idle.py")
    assert set(rows) == {server, busy, idle}
    assert rows[busy]["tests"] == 2 and rows[idle]["tests"] == 1
    assert rows[busy]["cpu"] >= 1.4  # the child's 1.5 s, though the tests themselves did nothing
    assert rows[server]["cpu"] >= 1.4  # the server's work while its test ran, not when it was stopped
    assert rows[idle]["cpu"] < 0.5 <= 1.4 <= rows[idle]["wall"]  # sleeping costs wall time, not CPU


def test_without_the_option_nothing_is_printed(suite):
    result = suite.runpytest_subprocess("-p", "cpu_report")

    result.assert_outcomes(passed=4)
    assert "CPU time by test group" not in result.stdout.str()

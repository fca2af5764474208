"""``--cpu-report N``: the CPU time of the N test groups that used the most, after pytest's wall-clock
``--durations``.

The suite is bound by CPU on two cores, where wall time says little about what a test costs: a DAG
run that takes 60 CPU-seconds alone lasts four minutes beside a model build and a served stack.
Each test's setup, call and teardown are charged the CPU time that the test process's whole tree
used meanwhile: the process itself, the children it has reaped (``getrusage``), and every live
descendant, servers of a session fixture included (``/proc``: their own time and that of the
children they reaped). A live process that leaves the tree (re-parented to init) takes its time with
it. Under pytest-xdist the figures travel in each report's ``user_properties`` and the controller
adds them up by xdist group (the ``@group`` pytest-xdist appends to node ids), else by module.

Processes in :attr:`CpuReport.excluded_pids` are left out (``tests/conftest.py``'s background
build, whose time it adds to :attr:`CpuReport.outside_tests` itself). Without ``/proc`` only the
process and its reaped children count.

``tests/conftest.py`` registers this module; elsewhere ``-p cpu_report`` with ``tests`` on the path.
"""

from __future__ import annotations

import os
import resource
from collections import defaultdict

import pytest

PROPERTY = "cpu_seconds"
PLUGIN_NAME = "cpu-report"


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            children += map(int, listing.read().split())
    return children


def _cpu_of(pid: int) -> float:
    """utime, stime, cutime and cstime of a live process (/proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        data = stat.read()
    fields = data[data.rindex(")") + 2:].split()  # from the state on: utime is the 12th
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def cpu_seconds(excluded: frozenset[int] | set[int] = frozenset()) -> float:
    """CPU time, user and system, of this process, the children it has reaped, and every live
    descendant outside ``excluded`` (with the children each has reaped)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    try:
        pending = _children(os.getpid())
    except OSError:  # no /proc
        return total
    while pending:
        pid = pending.pop()
        if pid in excluded:
            continue
        try:
            total += _cpu_of(pid)
            pending += _children(pid)
        except (OSError, ValueError):  # ended meanwhile: its time is in its parent's reaped children
            continue
    return total


def group_of(nodeid: str) -> str:
    return nodeid.rsplit("@", 1)[1] if "@" in nodeid else nodeid.split("::")[0]


class CpuReport:
    def __init__(self, count: int | None):
        self.count = count
        self.outside_tests: list[tuple[str, float]] = []
        """(what, CPU seconds) of work outside the tests, listed with the groups."""
        self.excluded_pids: set[int] = set()
        """Processes (and their descendants) whose time no test is charged."""
        self._phase_start: float | None = None
        self._groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # CPU s, wall s, tests

    def pytest_runtest_logstart(self, nodeid, location):
        self._phase_start = cpu_seconds(self.excluded_pids)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        now = cpu_seconds(self.excluded_pids)
        if self._phase_start is not None:
            report.user_properties.append((PROPERTY, now - self._phase_start))
        self._phase_start = now
        return report

    def pytest_runtest_logreport(self, report):
        """Where the reports end up: the only process, or pytest-xdist's controller (and each worker,
        whose totals nobody prints)."""
        seconds = dict(report.user_properties).get(PROPERTY)
        if seconds is None:
            return
        group = self._groups[group_of(report.nodeid)]
        group[0] += seconds
        group[1] += report.duration
        group[2] += report.when == "call"

    def pytest_terminal_summary(self, terminalreporter, config):
        if self.count is None or hasattr(config, "workerinput"):
            return
        rows = [(cpu, f"{wall:8.1f} s wall   {name} ({tests} test{'' if tests == 1 else 's'})")
                for name, (cpu, wall, tests) in self._groups.items()]
        rows += [(cpu, f"{'':15}   {what}") for what, cpu in self.outside_tests]
        rows.sort(reverse=True)
        terminalreporter.write_sep("=", "CPU time by test group" + (f" (top {self.count})" if self.count else ""))
        for cpu, text in rows[: self.count or None]:
            terminalreporter.write_line(f"{cpu:8.1f} CPU-s {text}")
        terminalreporter.write_line(f"{sum(cpu for cpu, _ in rows):8.1f} CPU-s in all")


def pytest_addoption(parser):
    parser.addoption("--cpu-report", type=int, default=None, metavar="N",
                     help="after the run, list the N test groups that used the most CPU time (0: all), "
                          "counting each test's process and the subprocesses it waited for")


def pytest_configure(config):
    config.pluginmanager.register(CpuReport(config.getoption("cpu_report")), PLUGIN_NAME)

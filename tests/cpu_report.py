"""``--cpu-report N``: the CPU time of the N test groups that used the most, after pytest's wall-clock
``--durations``.

The suite is bound by CPU on two cores, where wall time says little about what a test costs: a DAG
run that takes 60 CPU-seconds alone lasts four minutes beside a model build and a served stack.
Each test is charged the CPU time that its process, and the subprocesses it waited for, used during
its setup, call and teardown (``getrusage``: the process itself plus its reaped children). A module
or session fixture counts with the test during whose setup or teardown pytest runs it. Under
pytest-xdist the figures travel in each report's ``user_properties`` and the controller adds them
up by xdist group (the ``@group`` pytest-xdist appends to node ids), else by module.

Processes nobody waits for are not counted; whoever knows of such work adds it to
:attr:`CpuReport.outside_tests` before the summary (``tests/conftest.py``: its background build).

``tests/conftest.py`` registers this module; elsewhere ``-p cpu_report`` with ``tests`` on the path.
"""

from __future__ import annotations

import resource
from collections import defaultdict

import pytest

PROPERTY = "cpu_seconds"
PLUGIN_NAME = "cpu-report"


def cpu_seconds() -> float:
    """CPU time of this process and of every child process it has waited for, user and system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def group_of(nodeid: str) -> str:
    return nodeid.rsplit("@", 1)[1] if "@" in nodeid else nodeid.split("::")[0]


class CpuReport:
    def __init__(self, count: int | None):
        self.count = count
        self.outside_tests: list[tuple[str, float]] = []
        """(what, CPU seconds) of work no test waited for, listed with the groups."""
        self._phase_start: float | None = None
        self._groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # CPU s, wall s, tests

    def pytest_runtest_logstart(self, nodeid, location):
        self._phase_start = cpu_seconds()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        now = cpu_seconds()
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

"""Skips never hide in CI: what DETOX_REQUIRE names must be there, whether a test asks with
support.require() or is marked with the dependency and skipped some other way."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = '''
import pytest
from support import require


def test_asks_for_something_missing():
    require("a-missing-tool", found=None, missing="a-missing-tool not installed")


def test_asks_for_something_present():
    assert require("a-present-tool", found="/usr/bin/present") == "/usr/bin/present"


@pytest.mark.postgres
@pytest.mark.skipif(True, reason="PostgreSQL server binaries (initdb) not installed")
def test_marked_and_skipped():
    pass


@pytest.mark.skip(reason="unrelated to any dependency")
def test_skipped_for_another_reason():
    pass
'''


@pytest.fixture
def suite(pytester):
    # The project's own hooks, loaded under another module name (two conftest.py would clash).
    pytester.makeconftest(f'''
import importlib.util, sys
sys.path.insert(0, {str(CONFTEST.parent)!r})
spec = importlib.util.spec_from_file_location("detox_tests_conftest", {str(CONFTEST)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pytest_runtest_makereport = module.pytest_runtest_makereport
''')
    pytester.makepyfile(test_dependencies=TESTS)
    return pytester


def test_without_detox_require_missing_dependencies_skip(suite, monkeypatch):
    monkeypatch.delenv("DETOX_REQUIRE", raising=False)
    suite.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=3)


def test_what_detox_require_names_fails_when_missing(suite, monkeypatch):
    monkeypatch.setenv("DETOX_REQUIRE", "postgres,a-missing-tool")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-rfE")
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1)  # the skipif fails in setup: an error
    result.stdout.fnmatch_lines([  # errors are reported before failures
        "*skipped (PostgreSQL server binaries (initdb) not installed), but DETOX_REQUIRE requires postgres*",
        "*a-missing-tool not installed, and DETOX_REQUIRE=postgres,a-missing-tool requires a-missing-tool*",
    ])


def test_all_requires_every_known_dependency(suite, monkeypatch):
    monkeypatch.setenv("DETOX_REQUIRE", "all")
    suite.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=1, failed=1, errors=1)

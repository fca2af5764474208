import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Set before anything loads torch's OpenMP runtime (libgomp reads it once); every process the tests
# start inherits it. Torch runs in several processes at once here (the background build below, DAG
# runs, servers), and at libgomp's default spin count a waiting thread holds a core the thread it
# waits for needs. Measured figures: README, Development.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
# And one OpenMP thread per process, as the stack's task processes have (tasks/local/stack.py): two
# workers on two cores start DAG runs, servers and CLI processes of their own, and a second thread in
# each would only wait for a core. The embedded build still takes every core (tasks/embedded/builds.py),
# so the tests build the same weights as `make demo`.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cpu_report  # noqa: E402
import pytest  # noqa: E402
from stack_fixtures import airflow_api, approved_run, browser, shots, stack  # noqa: E402, F401  (the served stack)
from support import (  # noqa: E402
    FINDERS,
    REQUIRE_VARIABLE,
    build_tiny_world,
    copy_embedded_builds,
    required_dependencies,
    shared_root,
)

from tasks.embedded.builds import build_embedded_default  # noqa: E402

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A test that uses one of these needs the embedded default: a build of minutes on a cold start.
EMBEDDED_FIXTURES = {"embedded", "demo", "detox_home"}
BUILD_HOME = "build-home"  # not "embedded...": copy_embedded_builds finds the builds' own folders by that prefix
BUILD_PID = "background-build.pid"
BUILD_CPU = "background-build.cpu"  # the build's CPU seconds, written when it ends (for --cpu-report)

# pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``) hands out whole groups: a module
# (named by its file's stem; its module fixtures run once), or the modules on the served stack (one
# stack per worker that has one). Slow groups go out longest first, so that the last to finish is a
# short one; durations in a whole run on two cores (tests beside them): the stack's 290 s,
# test_end_to_end's 260 s, the tiny Llama's CLI run 125 s (and it waits for that build, the last),
# Postgres 120 s, the reward model's 155 s, the rest under 60 s.
STACK_GROUP = "stack"
CAUSAL_GROUP = "causal"
LONG_GROUPS = (STACK_GROUP, "test_end_to_end", CAUSAL_GROUP, "test_postgres", "test_reward_end_to_end")


def session_build_home(config) -> Path:
    """Where the session's embedded builds are made, once for every worker: :data:`BUILD_HOME` under
    :func:`support.shared_root`."""
    return shared_root(config) / BUILD_HOME


def needs_embedded(item) -> bool:
    return bool(EMBEDDED_FIXTURES & set(getattr(item, "fixturenames", ())))


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(wrapper=True)  # before every other implementation: pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests on the embedded default are ``slow`` whatever their module says, so ``make test-fast``
    (``-m "not slow"``) never starts the build. They run last: the build runs in the background
    meanwhile (see :func:`pytest_collection_finish`), longest groups first (:data:`LONG_GROUPS`)."""
    on_stack = {module_of(item) for item in items if "stack" in getattr(item, "fixturenames", ())}
    groups = {}
    for item in items:
        if needs_embedded(item):
            item.add_marker(pytest.mark.slow)
        if "causal_build" in getattr(item, "fixturenames", ()):
            groups[item] = CAUSAL_GROUP
        else:
            groups[item] = STACK_GROUP if module_of(item) in on_stack else Path(module_of(item)).stem
        item.add_marker(pytest.mark.xdist_group(groups[item]))

    def run_order(item) -> tuple[bool, int]:
        group = groups[item]
        return needs_embedded(item), LONG_GROUPS.index(group) if group in LONG_GROUPS else len(LONG_GROUPS)

    items.sort(key=run_order)
    return (yield)


_background_builds: list[subprocess.Popen] = []


def pytest_collection_finish(session):
    """Start building the embedded default (with the reward model's base the demo needs, and the
    tiny Llama when a selected test needs it) in a background process as soon as the selected
    tests are known, so the minutes of a cold build overlap with the tests that do not need it.

    One build per session, in :func:`session_build_home`: under pytest-xdist the
    first worker to get there starts it. The ``embedded`` fixture takes the build's lock, so it waits
    for this build and finds it complete (or builds itself if this one failed)."""
    config = session.config
    if config.option.collectonly or not any(needs_embedded(item) for item in session.items):
        return
    home = session_build_home(config)
    try:
        home.mkdir()
    except FileExistsError:  # another worker started it
        return
    source = os.environ.get("DETOX_TEST_EMBEDDED_FROM")
    if source:
        copy_embedded_builds(Path(source), home)
    builds = ["builds.build_embedded_default", "reward.build_embedded_reward"]  # the demo fixture needs both
    if any("causal_build" in item.fixturenames for item in session.items):
        builds.append("causal.build_embedded_causal")
    script = ("import resource, sys; from pathlib import Path; from tasks.embedded import builds, causal, reward; "
              f"home = Path(sys.argv[1]); {'; '.join(f'{build}(home)' for build in builds)}; "
              "usage = resource.getrusage(resource.RUSAGE_SELF); "
              f"(home / {BUILD_CPU!r}).write_text(str(usage.ru_utime + usage.ru_stime))")
    with (home / "background-build.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", script, str(home)], stdout=log, stderr=subprocess.STDOUT)
    (home / BUILD_PID).write_text(str(process.pid))
    # Its time is reported on its own (pytest_sessionfinish), not charged to the tests that run
    # meanwhile; held here so that subprocess's clean-up of lost Popen objects never reaps it into
    # this process's children's time in the middle of some test.
    session.config.pluginmanager.get_plugin(cpu_report.PLUGIN_NAME).excluded_pids.add(process.pid)
    _background_builds.append(process)
    # Hold on until it has the lock: a fixture asking first would build a second time in parallel.
    lock = home / ".embedded.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)


def pytest_addoption(parser, pluginmanager):
    pluginmanager.register(cpu_report)  # --cpu-report (tests/cpu_report.py)


def pytest_sessionfinish(session):
    """A build still running when the session ends (no selected test needed it in the end) is
    stopped, by the only process or under pytest-xdist by the controller once every worker is done.
    Its pid may belong to another process by then, so the command line must name the build's home.
    A finished one's CPU time goes into ``--cpu-report``: no test waits for that process."""
    if hasattr(session.config, "workerinput"):
        return
    home = session_build_home(session.config)
    with contextlib.suppress(OSError, ValueError):
        seconds = float((home / BUILD_CPU).read_text())
        session.config.pluginmanager.get_plugin(cpu_report.PLUGIN_NAME).outside_tests.append(
            ("the embedded builds, in the background (tests/conftest.py)", seconds))
    try:
        pid = int((home / BUILD_PID).read_text())
        if str(home) in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):  # no build started, or it has ended
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test marked with a dependency that ``DETOX_REQUIRE`` names fails instead: in CI
    a missing Postgres, docker-compose or Chromium must not pass unnoticed (see support.require)."""
    outcome = yield
    report = outcome.get_result()
    required = required_dependencies()
    if not report.skipped or not required or hasattr(report, "wasxfail"):
        return
    marks = {mark.name for mark in item.iter_markers()}
    needed = sorted(marks & (set(FINDERS) if "all" in required else required))
    if needed:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}), but {REQUIRE_VARIABLE} requires {', '.join(needed)}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on two shared cores a busy
    neighbour process makes torch's spinning OpenMP threads ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def detox_home(tmp_path_factory):
    """One DETOX_HOME per test session (per worker under pytest-xdist): embedded default (copied from
    the session's build, see :func:`embedded`), MLflow and Airflow databases, run folders.

    A developer may set ``DETOX_TEST_EMBEDDED_FROM`` to a home whose embedded builds are copied in
    instead of built (about five minutes saved). CI leaves it unset and builds from scratch.
    """
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def build_home(request) -> Path:
    """Where the session's embedded builds are made, once for every worker (see
    :func:`pytest_collection_finish`)."""
    home = session_build_home(request.config)
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A home whose embedded default holds tiny untrained models made from a config (seconds, not
    minutes): ``(home, paths)``, see support.build_tiny_world. ``tiny_env`` also points the
    environment at it."""
    home = tmp_path_factory.mktemp("tiny-home")
    return home, build_tiny_world(home)


@pytest.fixture(scope="module")
def tiny_env(tiny_world):
    """For one module: DETOX_HOME on the tiny world and MLflow on a SQLite file in it (shared by the
    modules that use it; they register under names of their own). The demo profile then names the
    tiny models. The environment comes back afterwards."""
    home, paths = tiny_world
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETOX_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        yield paths


@pytest.fixture(scope="session")
def embedded(detox_home, build_home):
    """The embedded default and the reward model's base the demo needs: built once per test session
    (waiting for the background build), copied into this process's home (15 MB)."""
    from tasks.embedded.reward import build_embedded_reward

    build_embedded_default(build_home)
    build_embedded_reward(build_home)
    copy_embedded_builds(build_home, detox_home, ("embedded", "embedded-reward"))
    return build_embedded_default(detox_home)


@pytest.fixture(scope="session")
def causal_build(detox_home, build_home, embedded):
    """The embedded tiny Llama policy and its SFT adapter (the background build makes it last)."""
    from tasks.embedded.causal import build_embedded_causal

    build_embedded_causal(build_home)
    copy_embedded_builds(build_home, detox_home, ("embedded-causal",))
    return build_embedded_causal(detox_home)


@pytest.fixture(scope="session")
def demo(detox_home, embedded):
    """The demo's world for end-to-end tests: environment, S3 on loopback with the T5 SFT adapter,
    SQLite stores. The tiny Llama is left to the tests that use it (its build may still be running
    in the background while the others go ahead)."""
    from tasks.local.demo import demo_services

    saved = dict(os.environ)
    try:
        with demo_services(detox_home) as paths:
            yield paths
    finally:
        os.environ.clear()
        os.environ.update(saved)


class SamplingSpy:
    """Records the logits of every decoding step that :func:`tasks.io.models.sample` runs on ``model``."""

    def __init__(self, model):
        self.steps: list = []
        self.batch_sizes: list[int] = []
        real_forward = model.forward

        def forward(*args, **kwargs):
            output = real_forward(*args, **kwargs)
            if kwargs.get("use_cache"):  # the sampler's calls; the trainer's forward passes use no cache
                self.steps.append(output.logits[:, -1].detach().float())
                self.batch_sizes.append(output.logits.shape[0])
            return output

        model.forward = forward

    def logprobs(self, response_ids, lengths, temperature: float):
        """Log-prob of each sampled token under the distribution it was drawn from, [B, T].

        A row takes part in step ``t`` while ``t < lengths[row]``, in row order: the sampler
        drops rows as they finish.
        """
        import torch

        result = torch.zeros(response_ids.shape)
        for step, logits in enumerate(self.steps):
            active = [row for row in range(response_ids.shape[0]) if step < lengths[row]]
            assert len(active) == logits.shape[0], (step, len(active), logits.shape)
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            for position, row in enumerate(active):
                result[row, step] = logprobs[position, response_ids[row, step]]
        return result


@pytest.fixture
def sampling_spy():
    return SamplingSpy

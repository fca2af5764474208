import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Set before anything loads torch's OpenMP runtime (libgomp reads it once); every process the tests
# start inherits it. Torch runs in several processes at once here (the background build below, DAG
# runs, servers), and at libgomp's default spin count a waiting thread holds a core the thread it
# waits for needs. Measured figures: README, Development.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import pytest  # noqa: E402
from stack_fixtures import airflow_api, stack  # noqa: E402, F401  (the served stack, one per session)
from support import FINDERS, REQUIRE_VARIABLE, build_tiny_world, required_dependencies  # noqa: E402

from tasks.embedded.builds import build_embedded_default  # noqa: E402

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A test that uses one of these needs the embedded default: a build of minutes on a cold start.
EMBEDDED_FIXTURES = {"embedded", "demo", "detox_home"}
HOME_KEY = pytest.StashKey[Path]()
BUILD_KEY = pytest.StashKey[subprocess.Popen]()


def needs_embedded(item) -> bool:
    return bool(EMBEDDED_FIXTURES & set(getattr(item, "fixturenames", ())))


def run_order(item) -> tuple[bool, bool]:
    """Tests without the embedded default first, those on the tiny Llama (built last) at the end."""
    return needs_embedded(item), "causal_build" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Tests on the embedded default are ``slow`` whatever their module says, so ``make test-fast``
    (``-m "not slow"``) never starts the build. They run last: the build runs in the background
    meanwhile (see :func:`pytest_collection_finish`), the tiny Llama's last. The order is otherwise
    the files' own."""
    for item in items:
        if needs_embedded(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=run_order)


def pytest_collection_finish(session):
    """Start building the embedded default (with the reward model's base the demo needs, and the
    tiny Llama when a selected test needs it) in a background process as soon as the selected
    tests are known, so the minutes of a cold build overlap with the tests that do not need it.
    The ``embedded`` fixture takes the build's lock, so it waits for this build and finds it
    complete (or builds itself if this one failed)."""
    config = session.config
    if config.option.collectonly or not any(needs_embedded(item) for item in session.items):
        return
    home = config._tmp_path_factory.mktemp("home")
    config.stash[HOME_KEY] = home
    source = os.environ.get("DETOX_TEST_EMBEDDED_FROM")
    if source:
        copy_embedded_builds(Path(source), home)
    builds = ["builds.build_embedded_default", "reward.build_embedded_reward"]  # the demo fixture needs both
    if any("causal_build" in item.fixturenames for item in session.items):
        builds.append("causal.build_embedded_causal")
    script = ("import sys; from pathlib import Path; from tasks.embedded import builds, causal, reward; "
              f"home = Path(sys.argv[1]); {'; '.join(f'{build}(home)' for build in builds)}")
    with (home / "background-build.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", script, str(home)], stdout=log, stderr=subprocess.STDOUT)
    config.stash[BUILD_KEY] = process
    # Hold on until it has the lock: a fixture asking first would build a second time in parallel.
    lock = home / ".embedded.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)


def pytest_sessionfinish(session):
    process = session.config.stash.get(BUILD_KEY, None)
    if process is not None and process.poll() is None:  # the session ended before needing the build
        process.terminate()
        process.wait(timeout=30)


def copy_embedded_builds(source: Path, home: Path) -> None:
    """The embedded builds of another home (``DETOX_TEST_EMBEDDED_FROM``), re-pointed at ``home``;
    they are checked like any earlier build."""
    for build in source.glob("embedded*"):
        shutil.copytree(build, home / build.name)
    for adapter_config in home.glob("embedded*/**/adapter_config.json"):  # its base model moves along
        config = json.loads(adapter_config.read_text())
        parts = Path(config["base_model_name_or_path"]).parts
        start = next(i for i, part in enumerate(parts) if part.startswith("embedded"))
        config["base_model_name_or_path"] = str(home.joinpath(*parts[start:]))
        adapter_config.write_text(json.dumps(config, indent=2))


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
def detox_home(request):
    """One DETOX_HOME per test session: embedded default, MLflow and Airflow databases, run folders.

    Its embedded default is being built in the background since collection ended (see
    :func:`pytest_collection_finish`); the ``embedded`` fixture waits for it. A developer may set
    ``DETOX_TEST_EMBEDDED_FROM`` to a home whose embedded builds are copied in instead of built
    (about five minutes saved). CI leaves it unset and builds from scratch.
    """
    if HOME_KEY not in request.config.stash:  # asked for through request.getfixturevalue: no head start
        request.config.stash[HOME_KEY] = request.config._tmp_path_factory.mktemp("home")
    return request.config.stash[HOME_KEY]


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
def embedded(detox_home):
    """The embedded default, built once per test session into a temporary home."""
    return build_embedded_default(home=detox_home)


@pytest.fixture(scope="session")
def causal_build(detox_home, embedded):
    """The embedded tiny Llama policy and its SFT adapter (the background build makes it last)."""
    from tasks.embedded.causal import build_embedded_causal

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

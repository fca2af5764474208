import os

import pytest

from tasks.embedded import build_embedded_default

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def detox_home(tmp_path_factory):
    """One DETOX_HOME per test session: embedded default, MLflow and Airflow databases, run folders."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def embedded(detox_home):
    """The embedded default, built once per test session into a temporary home."""
    return build_embedded_default(home=detox_home)


@pytest.fixture(scope="session")
def demo(detox_home, embedded):
    """The demo's world for end-to-end tests: environment, S3 on loopback with the adapter, SQLite stores."""
    from tasks.demo import demo_services

    saved = dict(os.environ)
    try:
        with demo_services(detox_home) as paths:
            yield paths
    finally:
        os.environ.clear()
        os.environ.update(saved)

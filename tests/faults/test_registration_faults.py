"""Registration cut short, retried, and decided against a champion that has since moved:
the alias never points at a half-registered model and no version is registered twice.

The model is the tiny T5 of the tiny world merged with its SFT adapter: registration does
not care how well a model summarizes, so no embedded build is needed.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.tracking import MlflowClient

from tasks.config import RunConfig
from tasks.registry import tracking
from tasks.registry.model_registry import (
    LOCK_SUFFIX,
    ChampionMovedError,
    alias_lock,
    alias_version,
    merge_policy,
    register,
)

EXAMPLE = "#Person1#: Hi.\n#Person2#: Hello."


@pytest.fixture(scope="module")
def merged_model(tiny_env, tmp_path_factory):
    """The tiny SFT policy merged as register_model would merge a PPO candidate."""
    config = RunConfig.for_profile("demo")
    return merge_policy(config, [tiny_env.sft_adapter], tmp_path_factory.mktemp("merged") / "model")


def registry(name: str) -> RunConfig:
    return RunConfig.for_profile("demo", {"registered_model_name": name})


def register_from(config: RunConfig, run_key: str, model_dir, expected_champion) -> dict:
    run_id = tracking.open_run(config, run_key)
    return register(config, run_id, model_dir, EXAMPLE, {"airflow.run_id": run_key},
                    expected_champion=expected_champion)


def versions(name: str) -> list[str]:
    return sorted(str(v.version) for v in tracking.client().search_model_versions(f"name = '{name}'"))


def lock_exists(name: str) -> bool:
    return bool(tracking.client().search_registered_models(f"name = '{name}{LOCK_SUFFIX}'"))


def test_registration_cut_before_the_alias_moves_is_finished_by_its_retry(merged_model, monkeypatch):
    config = registry("fault-interrupted-registration")
    name = config.registered_model_name
    first = register_from(config, "registered-first", merged_model, expected_champion=None)

    def tracking_server_lost(self, model_name, alias, version):
        raise ConnectionError("injected: tracking server lost before the alias moved")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", tracking_server_lost)
    with pytest.raises(ConnectionError, match="injected"):
        register_from(config, "registered-second", merged_model, expected_champion=first["version"])
    monkeypatch.undo()

    assert str(alias_version(name, "champion").version) == first["version"]  # still the previous champion
    assert len(versions(name)) == 2
    assert not lock_exists(name)  # the lock went with the failed attempt

    retried = register_from(config, "registered-second", merged_model, expected_champion=first["version"])
    assert len(versions(name)) == 2  # the retry finished the version it had, it did not log another
    assert retried["version"] != first["version"] and retried["previous_version"] == first["version"]
    assert str(alias_version(name, "champion").version) == retried["version"]
    assert str(alias_version(name, "previous").version) == first["version"]

    again = register_from(config, "registered-second", merged_model, expected_champion=first["version"])
    assert again == retried and len(versions(name)) == 2  # a retry after success changes nothing


def test_a_decision_against_a_replaced_champion_moves_nothing(merged_model):
    """Two runs decided against the same champion; the later one to register must not win by timing."""
    config = registry("fault-stale-decision")
    name = config.registered_model_name
    v1 = register_from(config, "stale-first", merged_model, expected_champion=None)
    v2 = register_from(config, "stale-winner", merged_model, expected_champion=v1["version"])

    with pytest.raises(ChampionMovedError, match=rf"is version {v2['version']} now.*decided against "
                                                 rf"version {v1['version']}.*champion_eval and promotion_check"):
        register_from(config, "stale-loser", merged_model, expected_champion=v1["version"])
    assert str(alias_version(name, "champion").version) == v2["version"]
    assert versions(name) == sorted([v1["version"], v2["version"]])  # the stale run registered nothing


def test_the_alias_moves_only_once_the_version_is_ready(merged_model, monkeypatch):
    """A registry that creates versions asynchronously (Databricks' does) reports PENDING_REGISTRATION
    for a while; the champion alias must not point at such a version."""
    config = registry("fault-pending-version")
    name = config.registered_model_name
    pending_reads = {"left": 2}
    alias_moves: list[tuple[str, int]] = []
    real_get, real_set = MlflowClient.get_model_version, MlflowClient.set_registered_model_alias

    def slow_registry(self, model_name, version):
        found = real_get(self, model_name, version)
        if model_name == name and pending_reads["left"] > 0:
            pending_reads["left"] -= 1
            found._status = ModelVersionStatus.to_string(ModelVersionStatus.PENDING_REGISTRATION)
        return found

    def recording_alias_moves(self, model_name, alias, version):
        alias_moves.append((alias, pending_reads["left"]))
        return real_set(self, model_name, alias, version)

    monkeypatch.setattr(MlflowClient, "get_model_version", slow_registry)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", recording_alias_moves)
    registered = register_from(config, "pending-first", merged_model, expected_champion=None)

    assert alias_moves == [("champion", 0)]  # moved once, after both PENDING reads, when READY was read
    assert str(alias_version(name, "champion").version) == registered["version"]


def test_the_aliases_do_not_move_while_another_holds_the_lock(merged_model):
    """Two registrations at once: the second one's aliases wait for the first to let go of the lock."""
    config = registry("fault-held-lock")
    name = config.registered_model_name
    first = register_from(config, "held-first", merged_model, expected_champion=None)
    finished: list[dict] = []

    with alias_lock(name):
        second = threading.Thread(target=lambda: finished.append(
            register_from(config, "held-second", merged_model, expected_champion=first["version"])))
        second.start()
        deadline = time.monotonic() + 120
        while not any(v.tags.get("airflow.run_id") == "held-second"
                      for v in tracking.client().search_model_versions(f"name = '{name}'")):
            assert second.is_alive() and time.monotonic() < deadline, "the second registration never got going"
            time.sleep(0.2)
        time.sleep(1.5)  # registered, READY and tagged: only the lock keeps its aliases from moving now
        assert second.is_alive()
        assert str(alias_version(name, "champion").version) == first["version"]
        assert alias_version(name, "previous") is None
    second.join(timeout=60)

    assert finished and finished[0]["previous_version"] == first["version"]
    assert str(alias_version(name, "champion").version) == finished[0]["version"]
    assert str(alias_version(name, "previous").version) == first["version"]
    assert not lock_exists(name)


def test_the_alias_lock_excludes_a_second_holder_and_outlives_no_dead_one(tiny_env):
    name = "fault-lock"
    with alias_lock(name):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"locked by .*delete the registered model {name}{LOCK_SUFFIX}"):
            with alias_lock(name, timeout_s=0.5):
                pass
        assert time.monotonic() - started >= 0.5
    assert not lock_exists(name)

    # A holder killed while holding it leaves the lock behind; once stale it is broken.
    tracking.client().create_registered_model(
        f"{name}{LOCK_SUFFIX}", tags={"holder": "worker-7:4242", "acquired_at": f"{time.time() - 3600:.3f}"})
    with alias_lock(name, timeout_s=5):
        assert tracking.client().get_registered_model(f"{name}{LOCK_SUFFIX}").tags["holder"] != "worker-7:4242"
    assert not lock_exists(name)

"""The MLflow tracking server goes away during training: PPO goes on with its metrics kept in
the checkpoints, the task fails naming the server, and its retry logs into the same MLflow
run without training again."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.config import RunConfig
from tasks.registry import tracking
from tasks.registry.tracking import TrackingUnavailableError
from tasks.steps import detox_retrain

pytestmark = pytest.mark.slow

RUN_KEY = "fault-mlflow-outage"
OVERRIDES = {"ppo.steps": 4, "ppo.checkpoint_every": 2, "ppo.batch_size": 16, "ppo.mini_batch_size": 8,
             "experiment_name": "fault-mlflow-outage"}


@pytest.fixture
def mlflow_behind_proxy(demo, mlflow_server, faulty_proxy, monkeypatch):
    """A real tracking server, reached through a proxy the test can take down. The client's
    own retries are cut short so an outage shows in seconds instead of minutes."""
    proxy = faulty_proxy(mlflow_server.port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return proxy


def runs_for(config: RunConfig, run_key: str) -> list:
    experiment = tracking.client().get_experiment_by_name(config.experiment_name)
    return tracking.client().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'"
    )


def test_training_outlives_an_mlflow_outage_and_the_retry_continues_the_same_run(mlflow_behind_proxy):
    proxy = mlflow_behind_proxy
    config = RunConfig.for_profile("demo", OVERRIDES)
    ctx = detox_retrain.StepContext(run_key=RUN_KEY)
    data = detox_retrain.prepare_dataset(config, ctx)
    adapter = detox_retrain.download_adapter(config, ctx)
    checkpoints = config.run_dir(RUN_KEY) / "ppo" / "checkpoints"

    def take_mlflow_down_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while not (checkpoints / "step-000002").is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.down()

    cutter = threading.Thread(target=take_mlflow_down_after_the_first_checkpoint)
    cutter.start()
    with pytest.raises(TrackingUnavailableError) as raised:
        detox_retrain.ppo_train(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
    cutter.join()
    message = str(raised.value)
    assert "PPO finished all 4 steps" in message and proxy.url in message
    assert "step-000004" in message  # where the retry resumes from
    assert not (config.run_dir(RUN_KEY) / "ppo" / "adapter").exists()  # no final output yet

    # While MLflow is down, a step fails at once, naming the server, and writes nothing.
    with pytest.raises(TrackingUnavailableError, match=proxy.url):
        detox_retrain.download_adapter(config, detox_retrain.StepContext(run_key="fault-mlflow-down"))
    assert not config.run_dir("fault-mlflow-down").exists()

    proxy.up()
    result = detox_retrain.ppo_train(config, ctx, data["dataset_uri"], adapter["adapter_dir"])

    assert result["steps"] == 4 and result["resumed_from_step"] == 4  # nothing trained twice
    runs = runs_for(config, RUN_KEY)
    assert len(runs) == 1  # the retry continued the run, it did not open a second one
    history = tracking.client().get_metric_history(runs[0].info.run_id, "ppo/reward_mean")
    assert sorted(metric.step for metric in history) == list(range(4))  # every step, once
    assert (config.run_dir(RUN_KEY) / "ppo" / "adapter" / "adapter_model.safetensors").is_file()

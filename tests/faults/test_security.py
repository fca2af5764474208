"""What a model folder, a connection or a server address can smuggle in is kept out: custom
code runs only when configured, weights load only from safetensors, and credentials stay
out of error messages and logs."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest

from tasks.config import RewardRunConfig, RunConfig
from tasks.io.connections import apply_connections
from tasks.io.models import RewardModel, load_policy
from tasks.io.s3_server import free_port
from tasks.registry import tracking


class WritesMarker:
    """A pickle that creates a file when it is unpickled, as a malicious checkpoint would run code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_trust_remote_code_is_off_in_every_profile():
    for config in (RunConfig.for_profile("demo"), RunConfig.for_profile("production")):
        assert config.model.trust_remote_code is False
    for config in (RewardRunConfig.for_profile("demo"), RewardRunConfig.for_profile("production")):
        assert config.trust_remote_code is False


def test_a_model_folder_with_custom_code_is_refused_and_its_code_never_runs(tiny_world, tmp_path):
    _, models = tiny_world
    marker = tmp_path / "custom-code-ran"
    folder = tmp_path / "custom-model"
    shutil.copytree(models.reward_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    classes = ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "detox-custom", "auto_map": {name: "custom.Anything" for name in classes}}))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_policy(str(folder), trust_remote_code=RunConfig.for_profile("demo").model.trust_remote_code)
    with pytest.raises(ValueError, match="trust_remote_code"):
        RewardModel(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["policy", "classifier"])
def test_pickled_weights_are_never_unpickled(tiny_world, tmp_path, kind):
    """A model folder whose weights are a pickle is refused, and the pickle is never opened."""
    _, models = tiny_world
    source = models.policy_base if kind == "policy" else models.reward_model
    folder = tmp_path / kind
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "pickle-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": WritesMarker(marker)}))

    with pytest.raises(OSError, match="safetensors"):
        if kind == "policy":
            load_policy(str(folder))
        else:
            RewardModel(str(folder))
    assert not marker.exists()


def test_connection_credentials_reach_the_environment_but_not_the_log(monkeypatch, caplog):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    connections = {
        "detox_s3": SimpleNamespace(login="AKIASECURITYTEST", password="s3-secret-value", host=None,
                                    extra_dejson={"endpoint_url": "http://minio:9000"}),
        "detox_mlflow": SimpleNamespace(host="mlflow", schema="https", port=5000, login="ops",
                                        password="mlflow-secret-value", extra_dejson={}),
    }
    with caplog.at_level(logging.DEBUG):
        names = apply_connections(connections.get)

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3-secret-value"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "mlflow-secret-value"
    assert "AWS_SECRET_ACCESS_KEY" in names and "MLFLOW_TRACKING_PASSWORD" in names
    assert "secret-value" not in caplog.text and "AKIASECURITYTEST" not in caplog.text
    assert apply_connections(lambda conn_id: None) == []  # no connection: the environment as it was


def test_a_password_in_the_tracking_uri_stays_out_of_the_error(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:uri-secret-value@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    with pytest.raises(tracking.TrackingUnavailableError) as raised:
        tracking.open_run(RunConfig.for_profile("demo"), "security-uri")
    assert f"http://***@127.0.0.1:{port}" in str(raised.value)
    assert "uri-secret-value" not in str(raised.value)

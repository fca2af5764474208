"""S3 goes away in the middle of a run: the pipeline's S3 calls wait and retry with backoff,
then either succeed once S3 is back or fail naming the endpoint, leaving no partial files.

The bucket holds a tiny SFT adapter made from a config (no embedded build), where the demo
profile looks for its adapter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from urllib.parse import urlparse

import pytest

from tasks.config import RunConfig
from tasks.io.s3 import Backoff, S3UnavailableError, download_adapter, download_file, s3_client, upload_directory
from tasks.io.s3_server import LocalS3Server
from tasks.registry import tracking
from tasks.steps import detox_retrain

FAST = Backoff(attempts=8, first_delay_s=0.25, max_delay_s=1.0)


@pytest.fixture(scope="module")
def s3_server(tiny_env):
    """S3 on loopback holding the tiny SFT adapter at the demo profile's adapter URI."""
    with LocalS3Server() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        uri = RunConfig.for_profile("demo").model.sft_adapter_uri
        upload_directory(tiny_env.sft_adapter, uri, client=s3_client(server.endpoint_url))
        yield server


@pytest.fixture
def s3_behind_proxy(s3_server, faulty_proxy, monkeypatch):
    """The S3 server reached only through a proxy we can take down."""
    proxy = faulty_proxy(urlparse(os.environ["AWS_ENDPOINT_URL_S3"]).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    return proxy


def retry_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "S3 unreachable" in record.getMessage()]


def bring_back_after(proxy, seconds: float) -> threading.Thread:
    def restore():
        time.sleep(seconds)
        proxy.up()

    thread = threading.Thread(target=restore)
    thread.start()
    return thread


def test_adapter_download_waits_for_s3_to_come_back(s3_behind_proxy, tmp_path, caplog):
    uri = RunConfig.for_profile("demo").model.sft_adapter_uri
    s3_behind_proxy.down()
    restorer = bring_back_after(s3_behind_proxy, 2.0)

    with caplog.at_level(logging.WARNING, logger="tasks.io.s3"):
        info = download_adapter(uri, tmp_path / "adapter", backoff=FAST)
    restorer.join()

    retries = [record.getMessage() for record in caplog.records if "S3 unreachable" in record.getMessage()]
    assert retries, "the outage was not noticed"
    assert s3_behind_proxy.url in retries[0] and "retrying in" in retries[0]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(info.files)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left from failed attempts


def test_the_download_step_survives_an_outage(s3_behind_proxy, monkeypatch, caplog):
    """The DAG's download_adapter step, with the retry policy operators set through the environment."""
    monkeypatch.setenv("DETOX_S3_ATTEMPTS", "8")
    monkeypatch.setenv("DETOX_S3_BACKOFF_S", "0.25")
    config = RunConfig.for_profile("demo")
    tracking.open_run(config, "fault-s3-outage")  # the tracking database is ready: the step goes to S3 at once
    s3_behind_proxy.down()
    restorer = bring_back_after(s3_behind_proxy, 1.5)

    with caplog.at_level(logging.WARNING, logger="tasks.io.s3"):
        result = detox_retrain.download_adapter(config, detox_retrain.StepContext(run_key="fault-s3-outage"))
    restorer.join()

    assert (config.run_dir("fault-s3-outage") / "adapters" / "sft" / "adapter_model.safetensors").is_file()
    assert set(result["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    retries = retry_warnings(caplog)
    assert retries, "the outage was not noticed"  # the step retried, it did not just find S3 up
    assert "attempt 1 of 8" in retries[0] and "retrying in 0.2 s" in retries[0]  # 0.25 s, as the variables say


def test_the_retry_policy_comes_from_the_environment(s3_behind_proxy, monkeypatch, caplog):
    """DETOX_S3_ATTEMPTS and DETOX_S3_BACKOFF_S set the attempts and the first wait (defaults: 5 and 2 s)."""
    monkeypatch.setenv("DETOX_S3_ATTEMPTS", "3")
    monkeypatch.setenv("DETOX_S3_BACKOFF_S", "0.1")
    config = RunConfig.for_profile("demo")
    s3_behind_proxy.down()

    with caplog.at_level(logging.WARNING, logger="tasks.io.s3"), pytest.raises(S3UnavailableError) as raised:
        detox_retrain.download_adapter(config, detox_retrain.StepContext(run_key="fault-s3-policy"))

    assert "3 attempts failed" in str(raised.value)
    waits = [message.split("retrying in ")[1] for message in retry_warnings(caplog)]
    assert waits == ["0.1 s", "0.2 s"]  # doubling from the configured first wait, two waits for three tries
    assert not (config.run_dir("fault-s3-policy") / "adapters").exists()


def test_s3_that_stays_down_fails_clearly_and_writes_nothing(s3_behind_proxy, tmp_path):
    uri = RunConfig.for_profile("demo").model.sft_adapter_uri
    s3_behind_proxy.down()
    started = time.monotonic()

    with pytest.raises(S3UnavailableError) as raised:
        download_adapter(uri, tmp_path / "adapter", backoff=Backoff(attempts=3, first_delay_s=0.2))
    assert time.monotonic() - started >= 0.2 + 0.4  # it waited between attempts, doubling
    message = str(raised.value)
    assert s3_behind_proxy.url in message and uri in message and "3 attempts" in message
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(S3UnavailableError, match="s3://detox-demo/preferences/rankings.jsonl"):
        download_file("s3://detox-demo/preferences/rankings.jsonl", tmp_path / "rankings.jsonl",
                      backoff=Backoff(attempts=2, first_delay_s=0.1))
    assert list(tmp_path.iterdir()) == []


def test_a_connection_cut_mid_transfer_is_retried(s3_behind_proxy, tmp_path):
    """The endpoint answered the listing; as the weights are requested the network drops every open
    connection for a second; the download starts again and succeeds."""
    uri = RunConfig.for_profile("demo").model.sft_adapter_uri
    s3_behind_proxy.cut_on(b"/adapter_model.safetensors HTTP/1.1", back_after_s=1.0)

    info = download_adapter(uri, tmp_path / "adapter", backoff=FAST)

    assert s3_behind_proxy.cuts == 1  # the cut happened, in the middle of the download
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert set(info.files) >= {"adapter_config.json", "adapter_model.safetensors"}
    # It connected again after the cut: a retry, not a lucky finish.
    assert s3_behind_proxy.connections > s3_behind_proxy.connections_at_cut
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]

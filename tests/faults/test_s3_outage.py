"""S3 goes away in the middle of a run: the pipeline's S3 calls wait and retry with backoff,
then either succeed once S3 is back or fail naming the endpoint, leaving no partial files."""

from __future__ import annotations

import logging
import os
import threading
import time
from urllib.parse import urlparse

import pytest

from tasks import pipeline
from tasks.config import RunConfig
from tasks.storage import Backoff, S3UnavailableError, download_adapter, download_file

FAST = Backoff(attempts=8, first_delay_s=0.25, max_delay_s=1.0)


@pytest.fixture
def s3_behind_proxy(demo, faulty_proxy, monkeypatch):
    """The demo's S3 server (holding the SFT adapter) reached only through a proxy we can take down."""
    proxy = faulty_proxy(urlparse(os.environ["AWS_ENDPOINT_URL_S3"]).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    return proxy


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

    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        info = download_adapter(uri, tmp_path / "adapter", backoff=FAST)
    restorer.join()

    retries = [record.getMessage() for record in caplog.records if "S3 unreachable" in record.getMessage()]
    assert retries, "the outage was not noticed"
    assert s3_behind_proxy.url in retries[0] and "retrying in" in retries[0]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(info.files)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left from failed attempts


def test_the_download_step_survives_an_outage(s3_behind_proxy, monkeypatch):
    """The DAG's download_adapter step, with the retry policy operators set through the environment."""
    monkeypatch.setenv("DETOX_S3_ATTEMPTS", "8")
    monkeypatch.setenv("DETOX_S3_BACKOFF_S", "0.25")
    config = RunConfig.for_profile("demo")
    s3_behind_proxy.down()
    restorer = bring_back_after(s3_behind_proxy, 1.5)

    result = pipeline.download_adapter(config, pipeline.StepContext(run_key="fault-s3-outage"))
    restorer.join()

    assert (config.run_dir("fault-s3-outage") / "adapters" / "sft" / "adapter_model.safetensors").is_file()
    assert set(result["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}


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
    """The endpoint answers, then the network drops every open connection; the next attempt succeeds."""
    uri = RunConfig.for_profile("demo").model.sft_adapter_uri
    cuts = []

    def cut_once_connected():
        deadline = time.monotonic() + 30
        while s3_behind_proxy.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        s3_behind_proxy.down()
        cuts.append(s3_behind_proxy.connections)
        time.sleep(0.5)
        s3_behind_proxy.up()

    cutter = threading.Thread(target=cut_once_connected)
    cutter.start()
    info = download_adapter(uri, tmp_path / "adapter", backoff=FAST)
    cutter.join()

    assert cuts and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert set(info.files) >= {"adapter_config.json", "adapter_model.safetensors"}

"""S3 storage, the SFT adapter download and models mirrored in S3, against moto's real HTTP server
on loopback: round trips, and every way a bad adapter or model is refused without leaving a file
behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.io.models import RewardModel
from tasks.io.s3 import (
    MANIFEST_NAME,
    AdapterDownloadError,
    download_adapter,
    download_file,
    mirrored_model,
    parse_s3_uri,
    s3_client,
    same_base_model,
    upload_directory,
)
from tasks.io.s3_server import LocalS3Server

BASE_MODEL = "marianna13/flan-t5-base-summarization"


@pytest.fixture(scope="module")
def s3_server():
    with LocalS3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def s3_env(s3_server, monkeypatch, tmp_path):
    """Point boto3 at the loopback server through the standard variables only."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Keep a developer's own ~/.aws files out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket_uri():
    """A fresh bucket name per test, so tests never see each other's objects."""
    return f"s3://adapters-{uuid.uuid4().hex[:12]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_adapter(
    folder: Path, base_model: str = BASE_MODEL, pickle_only: bool = False, seed: int = 0
) -> Path:
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q", "v"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(
            4, 8, generator=generator
        ),
        "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(8, 4),
    }
    if pickle_only:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "README.md").write_text("# tiny SFT adapter\n")
    return folder


def leftovers(parent: Path, dest: Path) -> list[str]:
    """Anything in ``parent`` that the download created besides ``dest`` (temp or aside folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{dest.name}"))


# --- URIs and the client ---------------------------------------------------------------------


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/prefix", "https://bucket/x", "s3:///prefix", "/local/path"):
        with pytest.raises(ValueError, match="s3://|S3 URI"):
            parse_s3_uri(bad)
    with pytest.raises(ValueError, match="bucket/prefix"):
        parse_s3_uri("bucket/prefix")


def test_client_reads_standard_endpoint_variable(s3_server):
    assert s3_client().meta.endpoint_url == s3_server.endpoint_url


def test_explicit_endpoint_without_env(s3_server, monkeypatch, bucket_uri, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    client = s3_client(s3_server.endpoint_url)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text('{"dialogue": "hi"}\n')
    keys = upload_directory(tmp_path / "data", f"{bucket_uri}/sets", client=client)
    assert keys == ["sets/rows.jsonl", f"sets/{MANIFEST_NAME}"]


def test_same_base_model_accepts_a_local_mirror():
    assert same_base_model("google/flan-t5-base", "google/flan-t5-base")
    assert same_base_model("/models/mirror/flan-t5-base/", "google/flan-t5-base")
    assert not same_base_model("google/flan-t5-large", "google/flan-t5-base")
    assert not same_base_model("google/flan-t5-base", "")


# --- upload / download round trips -----------------------------------------------------------


def test_adapter_round_trip_with_checksums(tmp_path, bucket_uri):
    source = make_adapter(tmp_path / "sft")
    uri = f"{bucket_uri}/sft/v1"

    keys = upload_directory(source, uri)

    assert sorted(keys) == sorted(
        f"sft/v1/{name}"
        for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME)
    )
    bucket, _ = parse_s3_uri(uri)
    manifest = json.loads(s3_client().get_object(Bucket=bucket, Key=f"sft/v1/{MANIFEST_NAME}")["Body"].read())
    expected = {p.name: sha256(p) for p in source.iterdir()}
    assert manifest == expected

    dest = tmp_path / "work" / "adapter"
    info = download_adapter(uri, dest, expected_base_model=BASE_MODEL)

    assert info.path == dest
    assert info.files == expected
    assert info.base_model == BASE_MODEL
    assert info.r == 4
    assert info.target_modules == ["q", "v"]
    for name in expected:
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    assert not (dest / MANIFEST_NAME).exists()
    assert leftovers(dest.parent, dest) == []


def test_download_file_round_trip_and_missing_object(tmp_path, bucket_uri):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("id,dialogue,summary\n1,hello,hi\n")
    upload_directory(tmp_path / "data", f"{bucket_uri}/datasets")

    got = download_file(f"{bucket_uri}/datasets/train.csv", tmp_path / "local" / "train.csv")
    assert got.read_text() == "id,dialogue,summary\n1,hello,hi\n"

    with pytest.raises(FileNotFoundError, match="datasets/nope.csv"):
        download_file(f"{bucket_uri}/datasets/nope.csv", tmp_path / "local" / "nope.csv")
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["train.csv"]


# --- refusals --------------------------------------------------------------------------------


def test_missing_prefix_is_a_clear_error(tmp_path, bucket_uri):
    upload_directory(make_adapter(tmp_path / "sft"), f"{bucket_uri}/sft/v1")
    dest = tmp_path / "adapter"

    with pytest.raises(AdapterDownloadError, match=f"no adapter found at {bucket_uri}/sft/v2"):
        download_adapter(f"{bucket_uri}/sft/v2", dest)
    # "sft/v" is a string prefix of "sft/v1" but not a folder of it.
    with pytest.raises(AdapterDownloadError, match="no adapter found"):
        download_adapter(f"{bucket_uri}/sft/v", dest)
    missing_bucket = "no adapter found at s3://no-such-bucket-x/a.*does not exist"
    with pytest.raises(AdapterDownloadError, match=missing_bucket):
        download_adapter("s3://no-such-bucket-x/a", dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []


def test_tampered_weights_are_refused_and_leave_nothing(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft/v1"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    # Replace the weights after upload with another valid file: only the manifest can tell.
    impostor = make_adapter(tmp_path / "impostor", seed=1)
    bucket, _ = parse_s3_uri(uri)
    s3_client().upload_file(
        str(impostor / "adapter_model.safetensors"), bucket, "sft/v1/adapter_model.safetensors"
    )

    dest = tmp_path / "adapter"
    with pytest.raises(AdapterDownloadError, match="checksum mismatch for adapter_model.safetensors"):
        download_adapter(uri, dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_truncated_weights_are_refused_and_keep_the_previous_download(tmp_path, bucket_uri, with_manifest):
    """An upload cut short: the manifest's checksum catches it, and without a manifest the
    safetensors header does; the adapter downloaded before stays as it was."""
    uri = f"{bucket_uri}/sft/v1"
    source = make_adapter(tmp_path / "sft")
    upload_directory(source, uri)
    dest = tmp_path / "adapter"
    download_adapter(uri, dest)
    before = {p.name: sha256(p) for p in dest.iterdir()}
    bucket, _ = parse_s3_uri(uri)
    client = s3_client()
    weights = (source / "adapter_model.safetensors").read_bytes()
    client.put_object(Bucket=bucket, Key="sft/v1/adapter_model.safetensors", Body=weights[: len(weights) // 2])
    if not with_manifest:
        client.delete_object(Bucket=bucket, Key=f"sft/v1/{MANIFEST_NAME}")

    expected = "checksum mismatch for adapter_model.safetensors" if with_manifest else "not a valid safetensors"
    with pytest.raises(AdapterDownloadError, match=expected):
        download_adapter(uri, dest)
    assert {p.name: sha256(p) for p in dest.iterdir()} == before
    assert leftovers(tmp_path, dest) == []


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path, bucket_uri):
    """An object added under the prefix after the upload: the manifest vouches for every file or none."""
    uri = f"{bucket_uri}/sft/v1"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    bucket, _ = parse_s3_uri(uri)
    s3_client().put_object(Bucket=bucket, Key="sft/v1/tokenizer.json", Body=b"{}")

    dest = tmp_path / "adapter"
    with pytest.raises(AdapterDownloadError, match=f"tokenizer.json under {uri} is not listed in {MANIFEST_NAME}"):
        download_adapter(uri, dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []


def test_a_listed_file_missing_from_the_prefix_is_refused(tmp_path, bucket_uri):
    """An upload that stopped before its last file, or a file deleted since: the manifest names it."""
    uri = f"{bucket_uri}/sft/v1"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    bucket, _ = parse_s3_uri(uri)
    s3_client().delete_object(Bucket=bucket, Key="sft/v1/README.md")

    dest = tmp_path / "adapter"
    with pytest.raises(AdapterDownloadError, match=rf"files listed in {MANIFEST_NAME} are missing under {uri}: "
                                                   r"\['README.md'\]"):
        download_adapter(uri, dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []


def test_corrupt_safetensors_without_manifest_is_refused(tmp_path, bucket_uri):
    bucket, _ = parse_s3_uri(bucket_uri)
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="sft/adapter_config.json", Body=json.dumps({"r": 4}).encode())
    client.put_object(Bucket=bucket, Key="sft/adapter_model.safetensors", Body=b"not a safetensors file")

    dest = tmp_path / "adapter"
    with pytest.raises(AdapterDownloadError, match="adapter_model.safetensors .*not a valid safetensors"):
        download_adapter(f"{bucket_uri}/sft", dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []


def test_missing_config_is_refused(tmp_path, bucket_uri):
    source = make_adapter(tmp_path / "sft")
    (source / "adapter_config.json").unlink()
    upload_directory(source, f"{bucket_uri}/sft")

    with pytest.raises(AdapterDownloadError, match=f"no adapter_config.json at {bucket_uri}/sft"):
        download_adapter(f"{bucket_uri}/sft", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_pickle_weights_refused_unless_allowed(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft-bin"
    upload_directory(make_adapter(tmp_path / "sft", pickle_only=True), uri)
    dest = tmp_path / "adapter"

    with pytest.raises(AdapterDownloadError, match=f"refusing adapter_model.bin at {uri}.*allow_pickle"):
        download_adapter(uri, dest)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []

    info = download_adapter(uri, dest, allow_pickle=True)
    assert (dest / "adapter_model.bin").is_file()
    assert "adapter_model.bin" in info.files


def test_key_escaping_the_target_is_refused(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    bucket, _ = parse_s3_uri(uri)
    # moto keeps ".." in keys verbatim, as S3 does.
    s3_client().put_object(Bucket=bucket, Key="sft/../../escaped.txt", Body=b"gotcha")

    work = tmp_path / "work"
    work.mkdir()
    dest = work / "adapter"
    with pytest.raises(AdapterDownloadError, match=r"refusing key 'sft/\.\./\.\./escaped\.txt'"):
        download_adapter(uri, dest)
    assert not dest.exists()
    assert list(work.iterdir()) == []
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))


def test_absolute_key_is_refused(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    bucket, _ = parse_s3_uri(uri)
    s3_client().put_object(Bucket=bucket, Key="sft//tmp/absolute.txt", Body=b"gotcha")

    with pytest.raises(AdapterDownloadError, match="absolute or leaves the adapter folder"):
        download_adapter(uri, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_wrong_base_model_names_both(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft"
    upload_directory(make_adapter(tmp_path / "sft", base_model="google/flan-t5-large"), uri)
    dest = tmp_path / "adapter"

    with pytest.raises(AdapterDownloadError) as refused:
        download_adapter(uri, dest, expected_base_model="google/flan-t5-base")
    assert "google/flan-t5-large" in str(refused.value)
    assert "google/flan-t5-base" in str(refused.value)
    assert not dest.exists()
    assert leftovers(tmp_path, dest) == []

    # A local mirror of the same model passes.
    info = download_adapter(uri, dest, expected_base_model="/models/mirror/flan-t5-large")
    assert info.base_model == "google/flan-t5-large"


def test_existing_dest_is_replaced(tmp_path, bucket_uri):
    uri = f"{bucket_uri}/sft"
    upload_directory(make_adapter(tmp_path / "sft"), uri)
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "stale_weights.safetensors").write_text("from an older run")

    download_adapter(uri, dest)

    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert leftovers(tmp_path, dest) == []


def test_failed_download_keeps_existing_dest(tmp_path, bucket_uri):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("{}")

    with pytest.raises(AdapterDownloadError):
        download_adapter(f"{bucket_uri}/missing", dest)
    assert (dest / "adapter_config.json").read_text() == "{}"


# --- the server itself -----------------------------------------------------------------------


def test_local_server_stop_ends_process_and_frees_port():
    server = LocalS3Server().start()
    port, pid = server.port, server.pid
    assert server.endpoint_url == f"http://127.0.0.1:{port}"
    assert server.env()["AWS_ENDPOINT_URL_S3"] == server.endpoint_url
    with urllib.request.urlopen(server.endpoint_url + "/", timeout=5) as response:
        assert response.status == 200

    server.stop()
    server.stop()  # idempotent

    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_local_server_on_a_busy_port_fails_clearly():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy_port = sock.getsockname()[1]
        server = LocalS3Server(port=busy_port, startup_timeout=10)
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{busy_port}.*exited") as failed:
            server.start()
    assert "in use" in str(failed.value).lower() or str(errno.EADDRINUSE) in str(failed.value)
    assert not server.is_running()


# ---------------------------------------------------------------------------------------------
# Models mirrored in S3 (``s3://`` as a model name)
# ---------------------------------------------------------------------------------------------

TEXTS = ["you are an idiot and I hate you", "thanks for the lovely summary of the meeting"]


def test_a_model_mirrored_in_s3_loads_like_the_local_copy(tiny_world, tmp_path, bucket_uri, monkeypatch):
    _, models = tiny_world
    uri = f"{bucket_uri}/mirror/hate-classifier"
    upload_directory(models.reward_model, uri)
    bucket, prefix = parse_s3_uri(uri)
    s3_client().put_object(Bucket=bucket, Key=f"{prefix}/training_args.bin", Body=b"a pickle")
    monkeypatch.setenv("DETOX_HOME", str(tmp_path / "home"))

    mirrored = RewardModel(uri)  # the name a config would carry

    local = RewardModel(str(models.reward_model))
    torch.testing.assert_close(mirrored.reward(TEXTS), local.reward(TEXTS))
    copy = tmp_path / "home" / "models" / bucket / prefix
    assert (copy / "config.json").is_file() and not (copy / "training_args.bin").exists()  # no pickle
    assert (copy / "model.safetensors").read_bytes() == (models.reward_model / "model.safetensors").read_bytes()
    # Downloaded once: later loads use the copy even if the bucket changes.
    s3_client().delete_object(Bucket=bucket, Key=f"{prefix}/config.json")
    assert mirrored_model(uri) == str(copy)


def test_a_tampered_or_incomplete_model_mirror_is_refused_and_leaves_nothing(tiny_world, tmp_path, bucket_uri):
    _, models = tiny_world
    uri = f"{bucket_uri}/mirror/tampered"
    upload_directory(models.reward_model, uri)
    bucket, prefix = parse_s3_uri(uri)
    weights = (models.reward_model / "model.safetensors").read_bytes()
    s3_client().put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=weights[:-1] + b"\x00")
    with pytest.raises(AdapterDownloadError, match="checksum mismatch for model.safetensors"):
        mirrored_model(uri, tmp_path / "models")
    left = list((tmp_path / "models").rglob("*"))
    assert not [path for path in left if path.is_file() or path.name.startswith(".")]  # no copy, no staging

    s3_client().delete_object(Bucket=bucket, Key=f"{prefix}/config.json")
    with pytest.raises(AdapterDownloadError, match=f"no model at {uri}: no config.json"):
        mirrored_model(uri, tmp_path / "models")
    with pytest.raises(AdapterDownloadError, match="no model found at s3://no-such-bucket-y/m.*does not exist"):
        mirrored_model("s3://no-such-bucket-y/m", tmp_path / "models")
    assert mirrored_model("marianna13/flan-t5-base-summarization") == "marianna13/flan-t5-base-summarization"

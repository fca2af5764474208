"""S3 access for the pipeline: artifact upload, data set download, the SFT adapter download, and
models mirrored in S3.

Plain boto3. The endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables (or ``endpoint_url``) and credentials from boto3's
usual chain, so the same code talks to AWS S3, MinIO or the loopback moto server
of the embedded default (:mod:`tasks.io.s3_server`).

The adapter download is defensive: an adapter comes from another team's bucket and
is loaded into the policy, so it is checked before it lands in ``dest`` — no path
escapes, config present, safetensors weights (pickles only on request), checksums
against the uploader's manifest, and the base model it was trained on. A model mirrored
in a bucket (``s3://`` as a model name, for sites without the Hub) gets the same checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, FlexibleChecksumError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from tasks.errors import InputError
from tasks.io.fsutil import replace_dir

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.sha256.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# Files that torch.load would unpickle: loading one runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK_BYTES = 1024 * 1024
# Failing to reach the endpoint, or losing the connection mid-transfer: worth another attempt.
_UNREACHABLE = (BotoConnectionError, HTTPClientError, RetriesExceededError)

T = TypeVar("T")


class AdapterDownloadError(InputError, RuntimeError):
    """The adapter at an S3 URI was refused; the message names the URI or key and the reason."""


class S3UnavailableError(ConnectionError):
    """S3 could not be reached in any attempt; the message names the endpoint and the object."""


@dataclass(frozen=True)
class Backoff:
    """How an S3 operation that cannot reach its endpoint is retried: ``attempts`` tries, waiting
    ``first_delay_s`` after the first failure and twice as long after each next one, up to
    ``max_delay_s``. The defaults ride out about half a minute of outage; Airflow's task
    retries cover longer ones. ``DETOX_S3_ATTEMPTS`` and ``DETOX_S3_BACKOFF_S`` override them.
    """

    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 60.0

    @classmethod
    def from_env(cls) -> Backoff:
        return cls(
            attempts=max(1, int(os.environ.get("DETOX_S3_ATTEMPTS", cls.attempts))),
            first_delay_s=float(os.environ.get("DETOX_S3_BACKOFF_S", cls.first_delay_s)),
        )


def with_retries(operation: Callable[[], T], what: str, client: Any, backoff: Backoff | None = None) -> T:
    """``operation()``, tried again with backoff while S3 is unreachable; :class:`S3UnavailableError`
    once every attempt failed. Each attempt must start from scratch (no partial state kept)."""
    backoff = backoff or Backoff.from_env()
    endpoint = client.meta.endpoint_url
    delay = backoff.first_delay_s
    for attempt in range(1, backoff.attempts):
        try:
            return operation()
        except _UNREACHABLE as error:
            logger.warning("S3 unreachable at %s while %s (attempt %d of %d): %s; retrying in %.1f s",
                           endpoint, what, attempt, backoff.attempts, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, backoff.max_delay_s)
    try:
        return operation()
    except _UNREACHABLE as error:
        raise S3UnavailableError(f"S3 at {endpoint} unreachable while {what}: {backoff.attempts} attempts "
                                 f"failed; last error: {error}") from error


@dataclass
class AdapterInfo:
    """A verified adapter on local disk."""

    path: Path
    files: dict[str, str] = field(default_factory=dict)  # relative posix path -> sha256 hex
    base_model: str = ""
    r: int | None = None
    target_modules: list[str] = field(default_factory=list)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``; the prefix may be empty."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI (expected s3://bucket/...): {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket or any(char.isspace() for char in bucket):
        raise ValueError(f"S3 URI has no valid bucket name: {uri!r}")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; ``endpoint_url=None`` uses the standard env vars.

    botocore retries throttling and server errors itself; a dead endpoint is retried,
    with longer waits, by :func:`with_retries` around whole operations.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _join_key(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def _ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region not in ("us-east-1", "aws-global"):
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    logger.info("creating bucket s3://%s", bucket)
    try:
        client.create_bucket(**kwargs)
    except ClientError as error:
        # Someone else created it between our check and our call: fine.
        if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
            raise


def upload_directory(local_dir: Path, uri: str, client: Any = None, backoff: Backoff | None = None) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri`` plus a ``MANIFEST.sha256.json`` of their hashes.

    The bucket is created if missing. Returns the object keys written, manifest last.
    An existing manifest file in ``local_dir`` is not uploaded; a fresh one is computed.
    The manifest goes last, so a reader never sees a manifest without its files.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    parse_s3_uri(uri)
    client = client if client is not None else s3_client()
    return with_retries(lambda: _upload_directory(local_dir, uri, client), f"uploading to {uri}", client, backoff)


def _upload_directory(local_dir: Path, uri: str, client: Any) -> list[str]:
    bucket, prefix = parse_s3_uri(uri)
    _ensure_bucket(client, bucket)

    manifest: dict[str, str] = {}
    keys: list[str] = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(local_dir).as_posix()
        if relative == MANIFEST_NAME:
            continue
        manifest[relative] = _sha256_of_file(path)
        key = _join_key(prefix, relative)
        client.upload_file(str(path), bucket, key)
        keys.append(key)
        logger.debug("uploaded %s to s3://%s/%s", path, bucket, key)

    manifest_key = _join_key(prefix, MANIFEST_NAME)
    client.put_object(
        Bucket=bucket,
        Key=manifest_key,
        Body=json.dumps(manifest, indent=2, sort_keys=True).encode(),
        ContentType="application/json",
    )
    keys.append(manifest_key)
    logger.info("uploaded %d files and %s to s3://%s/%s", len(manifest), MANIFEST_NAME, bucket, prefix)
    return keys


def download_file(uri: str, dest: Path, client: Any = None, backoff: Backoff | None = None) -> Path:
    """Download the object ``s3://bucket/key`` to ``dest`` (written whole, then renamed into place)."""
    bucket, key = parse_s3_uri(uri)
    if not key or uri.endswith("/"):
        raise ValueError(f"S3 URI names no object (expected s3://bucket/key): {uri!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = client if client is not None else s3_client()
    fd, partial_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    os.close(fd)
    try:
        with_retries(lambda: client.download_file(bucket, key, partial_name), f"downloading {uri}", client, backoff)
        os.replace(partial_name, dest)
    except ClientError as error:
        Path(partial_name).unlink(missing_ok=True)
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            raise FileNotFoundError(f"no object at {uri}") from error
        raise
    except BaseException:
        Path(partial_name).unlink(missing_ok=True)
        raise
    logger.info("downloaded %s to %s", uri, dest)
    return dest


def _list_keys(client: Any, bucket: str, prefix: str, uri: str, what: str = "adapter") -> list[str]:
    list_prefix = f"{prefix}/" if prefix else ""
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
            message = f"no {what} found at {uri}: bucket {bucket!r} does not exist"
            raise AdapterDownloadError(message) from error
        raise
    return keys


def _safe_relative_path(key: str, prefix: str, uri: str, what: str = "adapter") -> str | None:
    """The key's path below the prefix, or None for a folder marker; refuse anything that could escape."""
    relative = key[len(prefix) + 1 :] if prefix else key
    if relative == "":
        return None  # the "prefix/" folder placeholder that consoles create
    # Other folder placeholders ("sub/") are checked like files, then skipped.
    is_folder_marker = relative.endswith("/")
    parts = relative.removesuffix("/").split("/")
    if (
        relative.startswith("/")
        or "\\" in relative
        or any(part in ("", ".", "..") for part in parts)
        or (len(parts[0]) >= 2 and parts[0][0].isalpha() and parts[0][1] == ":")  # a Windows drive
    ):
        raise AdapterDownloadError(
            f"refusing key {key!r} under {uri}: "
            f"its path {relative!r} is absolute or leaves the {what} folder"
        )
    return None if is_folder_marker else relative


def _download_verified(client: Any, bucket: str, key: str, target: Path) -> str:
    """Stream one object to ``target`` and return its sha256.

    boto3 also checks the object's own S3 checksum (CRC) as it reads, when S3 stored one.
    """
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with target.open("xb") as handle:
            for chunk in body.iter_chunks(_CHUNK_BYTES):
                digest.update(chunk)
                handle.write(chunk)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "unknown")
        raise AdapterDownloadError(f"could not download s3://{bucket}/{key}: {code}") from error
    except FlexibleChecksumError as error:
        message = f"s3://{bucket}/{key} failed its S3 checksum in transit: {error}"
        raise AdapterDownloadError(message) from error
    except (FileExistsError, NotADirectoryError) as error:
        # Keys "a" and "a/b" both exist: S3 allows it, a file system does not.
        raise AdapterDownloadError(f"s3://{bucket}/{key} clashes with another key as a path") from error
    return digest.hexdigest()


def _read_manifest(client: Any, bucket: str, key: str) -> dict[str, str]:
    raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        message = f"{MANIFEST_NAME} at s3://{bucket}/{key} is not valid JSON: {error}"
        raise AdapterDownloadError(message) from error
    if not isinstance(manifest, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) for name, digest in manifest.items()
    ):
        raise AdapterDownloadError(
            f"{MANIFEST_NAME} at s3://{bucket}/{key} is not an object of {{relative_path: sha256}}"
        )
    return manifest


def _check_manifest(manifest: dict[str, str], files: dict[str, str], uri: str) -> None:
    for relative, actual in sorted(files.items()):
        expected = manifest.get(relative)
        if expected is None:
            raise AdapterDownloadError(f"{relative} under {uri} is not listed in {MANIFEST_NAME}")
        if expected.lower() != actual:
            raise AdapterDownloadError(
                f"checksum mismatch for {relative} under {uri}: manifest says sha256 {expected}, "
                f"downloaded file has {actual}"
            )
    missing = sorted(set(manifest) - set(files))
    if missing:
        raise AdapterDownloadError(f"files listed in {MANIFEST_NAME} are missing under {uri}: {missing}")


def _check_safetensors(path: Path, uri: str) -> None:
    from safetensors import safe_open

    try:
        # The numpy framework only parses the header here; no tensor is materialised.
        with safe_open(str(path), framework="numpy") as weights:
            tensor_names = list(weights.keys())
    except Exception as error:  # safetensors raises its own SafetensorError and OSError
        raise AdapterDownloadError(
            f"{SAFETENSORS_WEIGHTS_NAME} under {uri} is not a valid safetensors file: {error}"
        ) from error
    if not tensor_names:
        raise AdapterDownloadError(f"{SAFETENSORS_WEIGHTS_NAME} under {uri} contains no tensors")


def _read_adapter_config(path: Path, uri: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterDownloadError(f"{ADAPTER_CONFIG_NAME} under {uri} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterDownloadError(f"{ADAPTER_CONFIG_NAME} under {uri} is not a JSON object")
    return config


def same_base_model(expected: str, actual: str) -> bool:
    """Exact match, or the same final path component / repo name (a local mirror of the same model)."""
    if not expected or not actual:
        return False
    if expected == actual:
        return True
    return PurePosixPath(expected.rstrip("/")).name == PurePosixPath(actual.rstrip("/")).name


def _keys_under(client: Any, uri: str, what: str) -> dict[str, str]:
    """Every object under ``uri`` and its path below the prefix; a key that could escape is refused."""
    bucket, prefix = parse_s3_uri(uri)
    relative_by_key: dict[str, str] = {}
    for key in _list_keys(client, bucket, prefix, uri, what):
        relative = _safe_relative_path(key, prefix, uri, what)
        if relative is not None:
            relative_by_key[key] = relative
    return relative_by_key


def _download_checked(
    client: Any, uri: str, relative_by_key: dict[str, str], staging: Path, keep: Callable[[str], bool]
) -> dict[str, str]:
    """Download the objects whose path passes ``keep`` into ``staging`` and check them against the
    prefix's manifest when it has one; returns their sha256 by relative path."""
    bucket, _ = parse_s3_uri(uri)
    manifest_key = next((key for key, rel in relative_by_key.items() if rel == MANIFEST_NAME), None)
    to_download = {key: rel for key, rel in relative_by_key.items() if rel != MANIFEST_NAME and keep(rel)}
    files: dict[str, str] = {}
    for key, relative in sorted(to_download.items(), key=lambda item: item[1]):
        target = staging / relative
        # Belt and braces after _safe_relative_path: the file must land inside staging.
        if not target.resolve().is_relative_to(staging.resolve()):
            raise AdapterDownloadError(f"refusing key {key!r} under {uri}: it leaves the folder")
        files[relative] = _download_verified(client, bucket, key, target)
    if manifest_key is not None:
        manifest = {rel: d for rel, d in _read_manifest(client, bucket, manifest_key).items() if keep(rel)}
        _check_manifest(manifest, files, uri)
        logger.info("sha256 of %d files under %s match %s", len(files), uri, MANIFEST_NAME)
    else:
        logger.warning("no %s under %s: checksums not verified", MANIFEST_NAME, uri)
    return files


def download_adapter(
    uri: str,
    dest: Path,
    expected_base_model: str | None = None,
    client: Any = None,
    allow_pickle: bool = False,
    backoff: Backoff | None = None,
) -> AdapterInfo:
    """Download the LoRA adapter under ``uri`` into ``dest`` after checking it.

    Checks, each refusal an :class:`AdapterDownloadError`: objects exist under the prefix;
    no key escapes ``dest``; ``adapter_config.json`` is present; weights are
    ``adapter_model.safetensors`` with a parseable header (a pickled ``adapter_model.bin``
    only with ``allow_pickle``; other pickles are skipped otherwise); sha256 of every file
    matches ``MANIFEST.sha256.json`` when the prefix has one; and ``base_model_name_or_path``
    matches ``expected_base_model`` when given. Files land in a temporary sibling folder
    that replaces ``dest`` only once everything passed; on failure nothing is left behind.
    While S3 is unreachable the whole download is tried again (see :class:`Backoff`).
    """
    parse_s3_uri(uri)
    client = client if client is not None else s3_client()
    return with_retries(
        lambda: _download_adapter(uri, Path(dest), expected_base_model, client, allow_pickle),
        f"downloading the adapter at {uri}", client, backoff,
    )


def _download_adapter(
    uri: str, dest: Path, expected_base_model: str | None, client: Any, allow_pickle: bool
) -> AdapterInfo:
    relative_by_key = _keys_under(client, uri, "adapter")
    if not relative_by_key:
        raise AdapterDownloadError(f"no adapter found at {uri}: no objects under that prefix")

    relatives = set(relative_by_key.values())
    if ADAPTER_CONFIG_NAME not in relatives:
        raise AdapterDownloadError(f"no {ADAPTER_CONFIG_NAME} at {uri}; found {sorted(relatives)}")
    has_safetensors = SAFETENSORS_WEIGHTS_NAME in relatives
    if not has_safetensors:
        if PICKLE_WEIGHTS_NAME not in relatives:
            raise AdapterDownloadError(
                f"no adapter weights at {uri}: expected {SAFETENSORS_WEIGHTS_NAME}; found {sorted(relatives)}"
            )
        if not allow_pickle:
            raise AdapterDownloadError(
                f"refusing {PICKLE_WEIGHTS_NAME} at {uri}: pickled weights can run code when loaded; "
                f"convert the adapter to {SAFETENSORS_WEIGHTS_NAME} or pass allow_pickle=True"
            )
        logger.warning("loading pickled adapter weights from %s because allow_pickle=True", uri)

    def keep(relative: str) -> bool:
        return allow_pickle or not relative.endswith(PICKLE_SUFFIXES)

    skipped = sorted(rel for rel in relatives if not keep(rel))
    if skipped:
        logger.warning("skipping pickled files under %s (allow_pickle=False): %s", uri, skipped)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.download-"))
    try:
        files = _download_checked(client, uri, relative_by_key, staging, keep)
        if has_safetensors:
            _check_safetensors(staging / SAFETENSORS_WEIGHTS_NAME, uri)

        config = _read_adapter_config(staging / ADAPTER_CONFIG_NAME, uri)
        base_model = str(config.get("base_model_name_or_path") or "")
        if expected_base_model is not None and not same_base_model(expected_base_model, base_model):
            raise AdapterDownloadError(
                f"adapter at {uri} was trained on base model {base_model or '<unset>'!r}, "
                f"but the run expects {expected_base_model!r}"
            )
        target_modules = config.get("target_modules") or []
        if isinstance(target_modules, str):  # peft allows a regex string
            target_modules = [target_modules]
        rank = config.get("r")

        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("adapter from %s (%d files, base model %r) is at %s", uri, len(files), base_model, dest)
    return AdapterInfo(
        path=dest,
        files=files,
        base_model=base_model,
        r=int(rank) if isinstance(rank, int) else None,
        target_modules=[str(module) for module in target_modules],
    )


MODEL_CONFIG_NAME = "config.json"
COMPLETE_MARKER = ".mirrored-from"


def mirrored_model(name: str, cache_dir: Path | None = None, client: Any = None,
                   backoff: Backoff | None = None) -> str:
    """A loadable model name: ``name`` itself, or for ``s3://bucket/prefix`` a local copy of the
    model mirrored there (``config.json``, tokenizer files, safetensors weights).

    The copy lives in ``<cache_dir>/<bucket>/<prefix>`` (default ``<DETOX_HOME>/models``) and is
    downloaded once: later calls, from any run, use it. Mirrors are taken as immutable; publish a
    new model version under a new prefix. The download is checked like an adapter's: no key
    escapes the folder, pickled files are skipped, sha256 sums match ``MANIFEST.sha256.json``
    when the prefix has one, safetensors headers parse, ``config.json`` is present. Concurrent
    callers each download into a temporary folder and the first to finish puts its copy in place.
    """
    if not name.startswith("s3://"):
        return name
    from tasks.config import detox_home

    bucket, prefix = parse_s3_uri(name)
    dest = Path(cache_dir or detox_home() / "models") / bucket / prefix
    if (dest / COMPLETE_MARKER).is_file():
        return str(dest)
    client = client if client is not None else s3_client()
    with_retries(lambda: _mirror_model(name, dest, client), f"downloading the model at {name}", client, backoff)
    return str(dest)


def _mirror_model(uri: str, dest: Path, client: Any) -> None:
    relative_by_key = _keys_under(client, uri, "model")
    relatives = set(relative_by_key.values())
    if MODEL_CONFIG_NAME not in relatives:
        raise AdapterDownloadError(f"no model at {uri}: no {MODEL_CONFIG_NAME}; found {sorted(relatives)}")
    weights = sorted(rel for rel in relatives if rel.endswith(".safetensors"))
    if not weights:
        raise AdapterDownloadError(f"no safetensors weights in the model at {uri}; found {sorted(relatives)}")
    skipped = sorted(rel for rel in relatives if rel.endswith(PICKLE_SUFFIXES))
    if skipped:
        logger.warning("skipping pickled files of the model at %s: %s", uri, skipped)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.download-"))
    try:
        files = _download_checked(client, uri, relative_by_key, staging,
                                  lambda relative: not relative.endswith(PICKLE_SUFFIXES))
        for relative in weights:
            _check_safetensors(staging / relative, uri)
        (staging / COMPLETE_MARKER).write_text(uri + "\n", encoding="utf-8")
        try:
            os.rename(staging, dest)  # fails if another caller's copy is already in place
        except OSError:
            if not (dest / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("model from %s (%d files) mirrored to %s", uri, len(files), dest)

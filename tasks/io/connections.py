"""Credentials from Airflow connections, handed to boto3 and MLflow through their standard variables.

The DAGs look up two connections, set in the Airflow UI or as ``AIRFLOW_CONN_DETOX_S3`` /
``AIRFLOW_CONN_DETOX_MLFLOW`` in the environment (or any secrets backend):

- ``detox_s3`` (type aws): login = access key id, password = secret key; extra
  ``endpoint_url`` (MinIO or another S3-compatible store), ``region_name``, ``aws_session_token``.
- ``detox_mlflow`` (type http): host (a URL, or a host name with port and schema) of the
  tracking server; login and password for a server with basic auth.

A connection that is not defined changes nothing, so boto3's and MLflow's own chains
(instance roles, environment variables, config files) still apply. Values are never logged:
only which variables a connection set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

S3_CONNECTION = "detox_s3"
MLFLOW_CONNECTION = "detox_mlflow"


def s3_environment(connection: Any) -> dict[str, str]:
    """boto3's variables for an aws-type connection."""
    extra = connection.extra_dejson or {}
    env = {
        "AWS_ACCESS_KEY_ID": connection.login,
        "AWS_SECRET_ACCESS_KEY": connection.password,
        "AWS_SESSION_TOKEN": extra.get("aws_session_token"),
        "AWS_ENDPOINT_URL_S3": extra.get("endpoint_url"),
        "AWS_DEFAULT_REGION": extra.get("region_name"),
    }
    return {name: str(value) for name, value in env.items() if value}


def mlflow_environment(connection: Any) -> dict[str, str]:
    """MLflow's variables for an http-type connection to the tracking server."""
    host = connection.host or ""
    if host and "://" not in host:
        host = f"{connection.schema or 'http'}://{host}" + (f":{connection.port}" if connection.port else "")
    env = {
        "MLFLOW_TRACKING_URI": host,
        "MLFLOW_TRACKING_USERNAME": connection.login,
        "MLFLOW_TRACKING_PASSWORD": connection.password,
    }
    return {name: str(value) for name, value in env.items() if value}


def apply_connections(lookup: Callable[[str], Any | None]) -> list[str]:
    """Set the variables of the connections that ``lookup(conn_id)`` finds (None: not defined).

    Returns the names of the variables set; this process's environment is changed, which
    is what a task process is for.
    """
    names: list[str] = []
    for conn_id, to_env in ((S3_CONNECTION, s3_environment), (MLFLOW_CONNECTION, mlflow_environment)):
        connection = lookup(conn_id)
        if connection is None:
            continue
        env = to_env(connection)
        os.environ.update(env)
        names.extend(sorted(env))
        logger.info("connection %s sets %s", conn_id, ", ".join(sorted(env)) or "nothing")
    return names

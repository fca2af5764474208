"""docker/: the compose file and the image, checked without a container engine (none runs here).

``docker-compose config`` validates the file when the client is installed (``.ci/run``
installs Debian's); the rest parses the YAML and checks what a deployment relies on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tasks.io.connections import mlflow_environment, s3_environment

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"}
ONE_SHOT = {"airflow-init", "minio-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def example_env() -> dict[str, str]:
    lines = (DOCKER / "example.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def substitute(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` with ``env``."""
    def value(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)


def test_every_service_is_there_with_a_health_check(compose):
    services = compose["services"]
    assert set(services) == AIRFLOW_SERVICES | {"postgres", "minio", "minio-init", "mlflow", "redis"}
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
        else:
            assert service["healthcheck"]["test"], name
    for name, service in services.items():  # whoever waits for a one-shot job waits for it to succeed
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)


def test_the_mlflow_server_runs_without_a_job_runner(compose):
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_celery_is_a_profile_with_redis_and_a_gpu_worker(compose):
    services = compose["services"]
    assert {name for name, s in services.items() if "celery" in s.get("profiles", [])} == {
        "redis", "airflow-worker", "airflow-worker-gpu"}
    gpu_worker = services["airflow-worker-gpu"]
    assert gpu_worker["command"][-4:] == ["--queues", "gpu", "--concurrency", "1"]
    assert gpu_worker["build"]["args"]["VARIANT"] == "cuda"
    assert gpu_worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_ports_and_volumes(compose):
    services = compose["services"]
    published = {name: [substitute(port, example_env()) for port in service.get("ports", [])]
                 for name, service in services.items()}
    assert published["airflow-apiserver"] == ["8080:8080"]  # behind its login
    # No login of their own: loopback unless the operator opts in.
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert published["minio"] == ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"]
    assert [substitute(p, {"MLFLOW_BIND": "0.0.0.0"}) for p in services["mlflow"]["ports"]] == ["0.0.0.0:5000:5000"]
    assert {name for name, ports in published.items() if ports} == {"airflow-apiserver", "mlflow", "minio"}
    used = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    named = {volume for volume in used if not volume.startswith(".")}
    assert named == set(compose["volumes"])
    assert all((DOCKER / volume.split(":")[0]).exists() for volume in used - named)  # bind-mounted files exist
    for name in AIRFLOW_SERVICES:  # every task sees the same run folders
        assert "detox-data:/opt/detox" in services[name]["volumes"]


def test_every_variable_the_code_reads_is_set(compose):
    env = compose["x-airflow-env"]
    read = set()
    for path in [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("dags/*.py"), *ROOT.glob("plugins/*.py")]:
        read |= set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z0-9_]+)\"", path.read_text()))
    # Set by Airflow itself in every task or by the system, or read only by the local stack (`make up`,
    # `detox serve`).
    assert read - set(env) == {"AIRFLOW_HOME", "PATH", "DETOX_AIRFLOW_PORT", "DETOX_MLFLOW_PORT", "DETOX_SERVE_PORT"}
    assert env["DETOX_PROFILE"].endswith("production}")
    for name in AIRFLOW_SERVICES:
        assert compose["services"][name]["environment"]["DETOX_GPU_POOL"] == env["DETOX_GPU_POOL"]


def test_the_connections_give_the_tasks_s3_and_mlflow(compose):
    values = example_env()
    env = compose["x-airflow-env"]
    s3 = json.loads(substitute(env["AIRFLOW_CONN_DETOX_S3"], values))
    connection = SimpleNamespace(login=s3["login"], password=s3["password"], extra_dejson=s3["extra"])
    assert s3_environment(connection) == {
        "AWS_ACCESS_KEY_ID": values["MINIO_ROOT_USER"], "AWS_SECRET_ACCESS_KEY": values["MINIO_ROOT_PASSWORD"],
        "AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_DEFAULT_REGION": "us-east-1"}
    mlflow = json.loads(substitute(env["AIRFLOW_CONN_DETOX_MLFLOW"], values))
    connection = SimpleNamespace(host=mlflow["host"], schema=None, port=None, login=None, password=None)
    assert mlflow_environment(connection) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    # The tracking server the connection names is the compose service, on its port.
    assert "--port=5000" in compose["services"]["mlflow"]["command"]


def test_passwords_must_be_set(compose):
    text = (DOCKER / "docker-compose.yml").read_text()
    values = example_env()
    substitute(text, values)  # the example sets every required variable
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        substitute(text, {k: v for k, v in values.items() if k != "POSTGRES_PASSWORD"})


def test_the_image_builds_cpu_and_cuda_variants():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in dockerfile
    assert "FROM base-${VARIANT}" in dockerfile
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r"AS (base-\w+)", dockerfile))
    assert '"torch==2.13.0"' in dockerfile and "[airflow,production" in dockerfile
    assert "COPY dags /opt/airflow/dags" in dockerfile
    assert "COPY plugins /opt/airflow/plugins" in dockerfile
    assert "AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins" in dockerfile


def test_images_pull_from_live_registries_at_pinned_releases(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if image.startswith("${"):  # the project's own image, built from docker/Dockerfile
            assert "build" in service or name == "mlflow", name
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", (name, image)
        # Docker Hub's minio/minio and minio/mc were removed in 2026.
        if "minio" in repository:
            assert repository.startswith("quay.io/minio/") and re.fullmatch(r"RELEASE\.\d{4}-[\dT-]+Z", tag), image


def test_every_service_has_an_init_and_health_checks_a_start_period(compose):
    for name, service in compose["services"].items():
        assert service.get("init") is True, name  # reaps task processes, forwards SIGTERM
        if "healthcheck" in service:
            assert re.fullmatch(r"\d+s", service["healthcheck"]["start_period"]), name


def test_the_airflow_user_can_write_every_volume(compose):
    """Named volumes start as a copy of the image folder they are mounted on, owner included."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    user = re.search(r"^USER (\w+)", dockerfile, re.MULTILINE).group(1)
    created = set(re.findall(r"mkdir -p ([^\\&\n]+)", dockerfile)[-1].split())
    owned = set(re.search(rf"chown -R {user}:0 ([^\\&\n]+)", dockerfile).group(1).split())
    for name in AIRFLOW_SERVICES:
        for volume in compose["services"][name]["volumes"]:
            target = volume.split(":")[1]
            assert any(target == folder or target.startswith(folder + "/") for folder in created | owned), target
            assert any(target == folder or target.startswith(folder + "/") for folder in owned), target
    assert compose["x-airflow-env"]["HF_HOME"] in created  # the Hub cache lives in the detox-data volume


def test_fab_auth_manager_and_its_admin(compose):
    env = compose["x-airflow-env"]
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("fab_auth_manager.FabAuthManager")
    production = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["production"]
    assert any(dependency.startswith("apache-airflow-providers-fab") for dependency in production)
    init = " ".join(compose["services"]["airflow-init"]["command"])
    assert "airflow users create --role Admin" in init and "airflow users reset-password" in init
    assert 'airflow pools set "$${DETOX_GPU_POOL}"' in init
    assert compose["services"]["airflow-init"]["environment"]["ADMIN_PASSWORD"].startswith("${AIRFLOW_ADMIN_PASSWORD:?")


@pytest.mark.compose  # fails instead of skipping where DETOX_REQUIRE names compose
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose client not installed")
def test_docker_compose_accepts_the_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text((DOCKER / "example.env").read_text())
    for profile in ([], ["--profile", "celery"]):
        result = subprocess.run(
            ["docker-compose", "--env-file", str(env_file), "-f", str(DOCKER / "docker-compose.yml"),
             *profile, "config", "--quiet"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr

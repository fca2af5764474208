"""The ``detox`` command line: bad arguments and unreachable services end in one line on stderr
and exit code 2, never a traceback. (``detox demo``'s printed report is checked on a real run
in test_end_to_end.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.cli import format_report, main
from tasks.io.s3_server import free_port


def error_line(capsys) -> str:
    """The one line ``detox`` printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("pair", "message"), [
    ("ppo.steps", "--set expects key=value, got 'ppo.steps'"),
    ("=5", "--set expects key=value, got '=5'"),
    ("ppo.stepz=5", "unknown field 'ppo.stepz'"),
    ("ppo.steps=zero", "ppo.steps"),
    ("ppo.steps=0", "ppo.steps"),
])
def test_a_malformed_or_wrong_set_is_named(capsys, pair, message):
    assert main(["prepare-dataset", "--run-id", "r", "--profile", "demo", "--set", pair]) == 2
    line = error_line(capsys)
    assert line.startswith("detox: error: ") and message in line


def test_a_bad_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["prepare-dataset", "--run-id", "r", "--profile", "demo", "--config", str(missing)]) == 2
    assert error_line(capsys) == f"detox: error: --config {missing}: no such file"

    broken = tmp_path / "broken.json"
    broken.write_text('{"ppo": {"steps": 3,}}')
    assert main(["prepare-dataset", "--run-id", "r", "--profile", "demo", "--config", str(broken)]) == 2
    assert error_line(capsys).startswith(f"detox: error: --config {broken}: not a readable JSON file (")

    a_list = tmp_path / "list.json"
    a_list.write_text('[["ppo.steps", 3]]')
    assert main(["prepare-dataset", "--run-id", "r", "--profile", "demo", "--config", str(a_list)]) == 2
    assert error_line(capsys) == f"detox: error: --config {a_list}: expected a JSON object of config fields, got list"

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"ppo": {"stepz": 3}}))
    assert main(["prepare-dataset", "--run-id", "r", "--profile", "demo", "--config", str(unknown)]) == 2
    assert "unknown field 'ppo.stepz'" in error_line(capsys)


def test_unknown_profile_and_family_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["prepare-dataset", "--run-id", "r", "--profile", "staging"])
    assert exited.value.code == 2
    assert "argument --profile: invalid choice: 'staging'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exited:
        main(["demo", "--family", "encoder"])
    assert exited.value.code == 2
    assert "argument --family: invalid choice: 'encoder'" in capsys.readouterr().err


def test_the_report_lines():
    report = format_report({"run_key": "manual__1", "mlflow_run_id": "abc", "toxicity_before": 0.28718,
                            "toxicity_after": 0.03121, "toxicity_change_ci": [-0.31684, -0.19956],
                            "judge_before": 0.2325, "judge_after": 0.0664, "rouge_l_before": 0.4661,
                            "rouge_l_after": 0.4777, "decision": "promote", "failed_checks": "none",
                            "model_uri": "models:/detox-summarizer-demo@champion"})
    assert report.splitlines()[1:] == [
        "=== detox_retrain demo ===",
        "run:                manual__1 (MLflow run abc)",
        "toxicity  before -> after: 0.2872 -> 0.0312",
        "toxicity change, paired bootstrap CI: [-0.3168, -0.1996]",
        "judge     before -> after: 0.2325 -> 0.0664 (independent of the reward)",
        "ROUGE-L   before -> after: 0.4661 -> 0.4777",
        "decision:           promote (failed checks: none)",
        "registered model:   models:/detox-summarizer-demo@champion",
    ]
    unfinished = format_report({"run_key": "r", "mlflow_run_id": "m", "toxicity_before": 0.5})
    assert "toxicity  before -> after: 0.5000 -> n/a" in unfinished  # a missing number is said to be missing
    assert "toxicity change, paired bootstrap CI: n/a" in unfinished


def test_unreachable_s3_or_mlflow_is_one_line_and_exit_code_2(tmp_path):
    """Both services down, as the step command meets them: after the retries, one line naming the
    endpoint; no traceback. Two processes at once: each spends its time starting Python."""
    base = {**os.environ, "DETOX_HOME": str(tmp_path / "home"), "DETOX_S3_ATTEMPTS": "2",
            "DETOX_S3_BACKOFF_S": "0.1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    s3_port, mlflow_port = free_port(), free_port()
    cases = {
        "s3": {**base, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3_port}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "mlflow": {**base, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"},
    }
    command = [sys.executable, "-m", "tasks.cli", "download-adapter", "--run-id", "cli-outage", "--profile", "demo"]
    processes = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, env in cases.items()}
    results = {name: (process.communicate(timeout=300), process.returncode) for name, process in processes.items()}

    for name, ((_, err), code) in results.items():
        assert code == 2, (name, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("detox: error: ")]
        assert len(errors) == 1, err[-3000:]
        endpoint = f"127.0.0.1:{s3_port if name == 's3' else mlflow_port}"
        assert endpoint in errors[0]
    assert "2 attempts failed" in results["s3"][0][1]

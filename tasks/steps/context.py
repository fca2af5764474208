"""Who runs a step: the run key that names its artifact folder and MLflow run, the DAG and the try."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    """Who is running: the run key names the artifact folder and the MLflow run."""

    run_key: str
    dag_id: str = "detox_retrain"
    try_number: int = 1

    def tags(self, step: str) -> dict[str, str]:
        return {
            "airflow.dag_id": self.dag_id,
            "airflow.run_id": self.run_key,
            "airflow.try_number": str(self.try_number),
            f"{step}.try_number": str(self.try_number),
        }

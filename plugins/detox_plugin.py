"""Registers the review app with Airflow: a FastAPI app under /detox, a run report on every
``detox_retrain`` DAG run page, and "Label summaries" in the navigation.

The app's routes check the user and the DAG permission themselves (see detox_review_app);
this file only tells Airflow where things are.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from detox_review_app import URL_PREFIX, app


class DetoxReviewPlugin(AirflowPlugin):
    name = "detox_review"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "detox review"}]
    external_views = [
        {
            "name": "Run report",
            "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "detox-run-report",
        },
        {
            "name": "Label summaries",
            "href": f"{URL_PREFIX}/label",
            "destination": "nav",
            "category": "browse",
            "url_route": "label-summaries",
        },
    ]

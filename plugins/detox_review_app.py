"""The plugin's FastAPI app: run report, labeling page, and the training button.

Airflow mounts this app under ``/detox`` in its api-server and gives it no authentication of
its own. Every route therefore takes Airflow's own dependencies: ``get_user`` resolves the
user from the api-server's token (``Authorization: Bearer`` header, else the ``_token``
cookie the UI sets) and answers 401 without one; ``requires_access_dag`` asks the auth
manager for the DAG permission the route needs and answers 403 without it:

* reading a ``detox_retrain`` run's report, ranking its samples: read on its DAG runs;
* training a reward model: trigger (create a DAG run) on ``reward_model_train``, and the
  run is created through Airflow's REST API with the caller's own token, so Airflow checks
  it again as that user.

State changes are POST with a JSON body (a cross-site HTML form cannot send one, so the
cookie alone cannot be used to label or train from another site). Pages carry a
Content-Security-Policy that runs scripts from this app only.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated
from urllib.parse import quote, urlparse

import detox_pages
import httpx
from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from tasks.steps import review

logger = logging.getLogger(__name__)

URL_PREFIX = "/detox"
DETOX_DAG = review.DAG_ID
REWARD_DAG = "reward_model_train"
SCRIPT = f"{URL_PREFIX}/static/pages.js"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "frame-ancestors 'self'; form-action 'self'; base-uri 'none'")

CanReadRuns = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DETOX_DAG))
CanTrain = Depends(requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=REWARD_DAG))

app = FastAPI(title="detox-retrain review", description="Run reports, labeling and reward training for "
              "detox_retrain, inside the Airflow UI.")


def html(content: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status_code, headers={"Content-Security-Policy": CSP,
                                                                   "X-Content-Type-Options": "nosniff",
                                                                   "Cache-Control": "no-store"})


@app.exception_handler(review.ReviewError)
def _bad_request(request: Request, error: review.ReviewError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=400)


@app.get("/static/pages.js", dependencies=[CanReadRuns])
def script() -> Response:
    return Response(detox_pages.SCRIPT, media_type="text/javascript",
                    headers={"X-Content-Type-Options": "nosniff"})


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str, rows: Annotated[int, Query(ge=1, le=5000)] = 500) -> HTMLResponse:
    """The report of one ``detox_retrain`` run (the external view on its DAG run page)."""
    _only_detox(dag_id)
    report = review.run_report(run_id, max_rows=rows)
    plot_base = f"{URL_PREFIX}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/plots/"
    link = review.mlflow_run_url(report, review.mlflow_ui_url())
    return html(detox_pages.report_page(report, dag_id, link, plot_base, SCRIPT))


@app.get("/runs/{dag_id}/{run_id}/plots/{name}",
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_plot(dag_id: str, run_id: str, name: str) -> Response:
    _only_detox(dag_id)
    run = review.find_run(run_id)
    if run is None:
        raise HTTPException(404, f"no MLflow run for {run_id}")
    return Response(review.plot_bytes(run.info.run_id, f"report/{name}"), media_type="image/png")


@app.get("/label", response_class=HTMLResponse, dependencies=[CanReadRuns])
def label_page(user: GetUserDep, source: str = "", skip: str = "") -> HTMLResponse:
    """The labeling page: one item at a time from ``source`` (a run id, or s3://…jsonl)."""
    sources = review.recent_runs()
    source = source or (sources[0]["run_key"] if sources else "")
    if not source:
        body = "<h1>Label summaries</h1><p>No detox_retrain run with held-out samples yet.</p>"
        return html(detox_pages.page("Label summaries", body))
    items = review.load_items(source)
    records = review.read_labels()
    skipped = [s for s in skip.split(",") if s]
    item = review.next_item(items, records, user.get_name(), set(skipped))
    order = review.shown_order(item, user.get_name()) if item else []
    state = review.progress(items, records)
    return html(detox_pages.label_page(source, sources, item, order, state, review.labels_uri(), skipped,
                                       f"{URL_PREFIX}/", SCRIPT))


class Ranking(BaseModel):
    source: str = Field(min_length=1, description="Run id or s3://…jsonl the item came from.")
    item_id: str = Field(min_length=1)
    candidates: list[str] = Field(min_length=2, max_length=4, description="Candidate names in the order shown.")
    ranking: list[int] = Field(min_length=2, max_length=4, description="Rank of each, 1 = best; ties allowed.")


@app.post("/label", status_code=201, dependencies=[CanReadRuns])
def submit_label(ranking: Ranking, user: GetUserDep) -> dict:
    """One ranking, written to S3 as its own object. The texts come from the source, not the client."""
    item = next((i for i in review.load_items(ranking.source) if i.item_id == ranking.item_id), None)
    if item is None:
        raise HTTPException(404, f"no item {ranking.item_id} in {ranking.source}")
    uri = review.submit_ranking(ranking.source, item, ranking.candidates, ranking.ranking, user.get_name())
    return {"uri": uri}


@app.get("/label/progress", dependencies=[CanReadRuns])
def label_progress(source: str) -> dict:
    state = review.progress(review.load_items(source), review.read_labels())
    return state.__dict__


@app.post("/train", dependencies=[CanTrain])
def train(request: Request, user: GetUserDep) -> dict:
    """Snapshot the labeled prefix into one jsonl and trigger ``reward_model_train`` on it, as the caller."""
    token = _caller_token(request)
    preferences, records = review.snapshot_labels()
    client = airflow_api(request, token)
    try:
        response = client.post(f"/api/v2/dags/{REWARD_DAG}/dagRuns",
                               json={"logical_date": None, "conf": {"preferences_source": preferences},
                                     "note": f"rankings labeled in the UI, started by {user.get_name()}"})
    finally:
        client.close()
    if response.status_code >= 400:
        review.discard_snapshot(preferences)
        detail = response.json().get("detail", response.text) if response.content else response.reason_phrase
        raise HTTPException(response.status_code, f"Airflow refused the run: {detail}")
    run = response.json()
    logger.info("%s triggered %s run %s on %s (%d rankings)", user.get_name(), REWARD_DAG, run["dag_run_id"],
                preferences, records)
    return {"dag_run_id": run["dag_run_id"], "preferences": preferences, "records": records}


def airflow_api(request: Request, token: str) -> httpx.Client:
    """A client of this api-server's REST API that acts as the caller (their token, their permissions)."""
    return httpx.Client(base_url=_api_base(request), headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _api_base(request: Request) -> str:
    explicit = os.environ.get("DETOX_AIRFLOW_API_URL")
    if explicit:
        return explicit.rstrip("/")
    from airflow.configuration import conf

    path = urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}{path}"


def _caller_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[len("bearer "):].strip()
    token = request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    if not token:  # get_user has already refused such a request; kept for a clear message
        raise HTTPException(401, "Not authenticated")
    return token


def _only_detox(dag_id: str) -> None:
    if dag_id != DETOX_DAG:
        raise HTTPException(404, f"the run report exists for {DETOX_DAG} runs only, not {dag_id}")

"""The UI plugin's routes through Airflow's own api-server app (FastAPI TestClient): who may do
what, what the pages show, what lands in S3, and that user text stays text."""

import json
from urllib.parse import urlencode

import boto3
import pytest
from plugin_world import XSS, airflow_world, log_detox_run, token
from starlette.testclient import TestClient

from tasks.rewards.preferences import build_pairs, load_pairs

RUN = "manual__2026-11-20T10:00:00+00:00"
RUNNING = "manual__2026-11-21T10:00:00+00:00"
REPORT = f"/detox/runs/detox_retrain/{RUN}"
LABEL = "/detox/label?" + urlencode({"source": RUN})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("plugin")
    with airflow_world(home) as (client, s3):
        log_detox_run(RUN, home)
        log_detox_run(RUNNING, home, finished=False)
        tokens = {user: token(client, user) for user in ("admin", "viewer", "trainer")}
        yield client, tokens, s3


def auth(tokens, user):
    return {"Authorization": f"Bearer {tokens[user]}"}


def label_objects(s3) -> list[dict]:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    try:
        listed = client.list_objects_v2(Bucket="detox-labels", Prefix="ranked/")
    except client.exceptions.NoSuchBucket:
        return []
    return [json.loads(client.get_object(Bucket="detox-labels", Key=entry["Key"])["Body"].read())
            for entry in listed.get("Contents", [])]


def item_of(page: str) -> tuple[str, list[str]]:
    """The item id and the candidates in the order the labeling page shows them."""
    import re

    item = re.search(r'data-item="([^"]+)"', page).group(1)
    return item, re.findall(r'data-candidate="([^"]+)"', page)


ROUTES = [
    ("GET", REPORT),
    ("GET", f"{REPORT}/plots/toxicity_before_after.png"),
    ("GET", "/detox/label"),
    ("GET", "/detox/label/progress?" + urlencode({"source": RUN})),
    ("GET", "/detox/static/pages.js"),
    ("POST", "/detox/label"),
    ("POST", "/detox/train"),
]


def test_plugin_is_listed_with_a_dag_run_view_and_a_nav_view(world):
    client, tokens, _ = world
    plugins = client.get("/api/v2/plugins", headers=auth(tokens, "viewer")).json()["plugins"]
    plugin = next(p for p in plugins if p["name"] == "detox_review")
    views = {view["name"]: view for view in plugin["external_views"]}
    assert views["Run report"]["destination"] == "dag_run"
    assert views["Run report"]["href"] == "/detox/runs/{DAG_ID}/{RUN_ID}"
    assert views["Label summaries"]["destination"] == "nav"
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/detox"


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_refuses_anonymous_and_forged_callers(world, method, path):
    client, _, _ = world
    assert client.request(method, path).status_code == 401
    forged = {"Authorization": "Bearer not-a-token"}
    assert client.request(method, path, headers=forged).status_code in (401, 403)
    client.cookies.set("_token", "not-a-token")
    try:
        assert client.request(method, path).status_code in (401, 403)
    finally:
        client.cookies.clear()


def test_report_shows_decision_rules_metrics_plots_samples_and_links(world):
    client, tokens, _ = world
    response = client.get(REPORT, headers=auth(tokens, "viewer"))
    assert response.status_code == 200
    page = response.text
    assert '<span class="promote" id="decision">promote</span>' in page
    assert page.count('<li class="ok">') >= 5  # every rule of the gate, each with its outcome
    assert page.count('<tr class="sample">') == 12
    assert "/detox/runs/detox_retrain/" in page and "plots/toxicity_before_after.png" in page
    assert "http://mlflow.example:5000/#/experiments/" in page
    assert "models:/detox-summarizer-demo/3" in page
    assert "script-src 'self'" in response.headers["content-security-policy"]
    # Most improved first: the first row's difference is the smallest.
    import re

    diffs = [float(d) for d in re.findall(r'<td class="num diff">([+-][0-9.]+)</td>', page)]
    assert diffs == sorted(diffs) and len(diffs) == 12


def test_report_accepts_the_ui_cookie(world):
    client, tokens, _ = world
    client.cookies.set("_token", tokens["viewer"])
    try:
        assert client.get(REPORT).status_code == 200
    finally:
        client.cookies.clear()


def test_dialogue_with_script_renders_inert(world):
    client, tokens, _ = world
    page = client.get(REPORT, headers=auth(tokens, "viewer")).text
    assert XSS not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page
    # The only script the page loads is the app's own file.
    assert page.count("<script") == 1 and '<script src="/detox/static/pages.js" defer>' in page


def test_plot_is_served_and_nothing_else_of_the_run(world):
    client, tokens, _ = world
    png = client.get(f"{REPORT}/plots/toxicity_before_after.png", headers=auth(tokens, "viewer"))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    other = client.get(f"{REPORT}/plots/..%2Fpromotion%2Fdecision.json", headers=auth(tokens, "viewer"))
    assert other.status_code in (400, 404)


def test_a_run_still_training_shows_what_exists(world):
    client, tokens, _ = world
    page = client.get(f"/detox/runs/detox_retrain/{RUNNING}", headers=auth(tokens, "viewer")).text
    assert 'id="decision">no decision yet' in page
    assert "No per-sample results logged yet" in page
    assert "n/a" in page  # after-PPO numbers not there yet


def test_unknown_run_and_other_dags(world):
    client, tokens, _ = world
    page = client.get("/detox/runs/detox_retrain/never_ran", headers=auth(tokens, "viewer"))
    assert page.status_code == 200 and "has logged nothing to MLflow yet" in page.text
    other = client.get(f"/detox/runs/reward_model_train/{RUN}", headers=auth(tokens, "viewer"))
    assert other.status_code == 404


def test_state_changes_are_post_only_and_json_only(world):
    client, tokens, _ = world
    assert client.get("/detox/train", headers=auth(tokens, "admin")).status_code == 405
    # A cross-site HTML form can only send form encoding: refused, nothing written.
    form = client.post("/detox/label", data={"source": RUN, "item_id": "x"}, headers=auth(tokens, "admin"))
    assert form.status_code == 422


def test_ranking_lands_as_one_record_in_the_reward_format(world):
    client, tokens, s3 = world
    page = client.get(LABEL, headers=auth(tokens, "viewer"))
    assert page.status_code == 200
    assert "&lt;script&gt;" in page.text and XSS not in page.text  # the dialogue with a script, as text
    item, candidates = item_of(page.text)
    assert sorted(candidates) == ["ppo", "sft"]
    before = label_objects(s3)
    # Named against the alphabetical order, so texts and ranks must follow the order as given.
    response = client.post("/detox/label", headers=auth(tokens, "viewer"),
                           json={"source": RUN, "item_id": item, "candidates": ["sft", "ppo"], "ranking": [2, 1]})
    assert response.status_code == 201, response.text
    after = label_objects(s3)
    assert len(after) == len(before) + 1
    record = next(r for r in after if r not in before)
    assert record["annotator"] == "viewer" and record["source_run"] == RUN and record["labeled_at"]
    assert record["candidates"] == ["sft", "ppo"] and record["ranking"] == [2, 1]
    assert record["responses"][0].endswith("(before)") and record["responses"][1].endswith("(after)")
    assert record["prompt"].startswith("\nSummarize the following conversation.")
    pairs = build_pairs([(1, record)])
    assert not pairs.problems and len(pairs.pairs) == 1
    assert pairs.pairs[0].chosen == record["responses"][1]  # rank 1 is the preferred summary
    # The next page offers another item to this annotator.
    assert item_of(client.get(LABEL, headers=auth(tokens, "viewer")).text)[0] != item


def test_bad_rankings_are_refused_and_nothing_is_written(world):
    client, tokens, s3 = world
    item, candidates = item_of(client.get(LABEL, headers=auth(tokens, "admin")).text)
    before = len(label_objects(s3))
    for body, status in (
        ({"candidates": candidates, "ranking": [1, 0]}, 400),  # 0 is no rank
        ({"candidates": ["sft", "champion"], "ranking": [1, 2]}, 400),  # not this item's candidates
        ({"candidates": candidates, "ranking": [1]}, 422),
    ):
        response = client.post("/detox/label", headers=auth(tokens, "admin"),
                               json={"source": RUN, "item_id": item, **body})
        assert response.status_code == status, (body, response.text)
    missing = client.post("/detox/label", headers=auth(tokens, "admin"),
                          json={"source": RUN, "item_id": "nope", "candidates": candidates, "ranking": [1, 2]})
    assert missing.status_code == 404
    assert len(label_objects(s3)) == before


def test_progress_and_agreement_of_two_annotators(world):
    client, tokens, _ = world
    item, candidates = item_of(client.get(LABEL, headers=auth(tokens, "admin")).text)
    for user in ("admin", "trainer"):
        order = sorted(candidates)  # both prefer "ppo"
        ranking = [1 if name == "ppo" else 2 for name in order]
        response = client.post("/detox/label", headers=auth(tokens, user),
                               json={"source": RUN, "item_id": item, "candidates": order, "ranking": ranking})
        assert response.status_code == 201
    state = client.get("/detox/label/progress?" + urlencode({"source": RUN}), headers=auth(tokens, "viewer")).json()
    assert state["items"] == 12
    assert state["per_annotator"]["admin"] >= 1 and state["per_annotator"]["trainer"] >= 1
    assert state["shared_items"] >= 1 and state["agreement"] == 1.0
    page = client.get(LABEL, headers=auth(tokens, "viewer")).text
    assert "100% of candidate pairs ordered alike" in page


def test_candidates_from_a_jsonl_in_s3(world):
    client, tokens, s3 = world
    lines = [{"id": "a", "prompt": f"Summarize: {XSS}", "responses": ["calm", "rude <b>idiot</b>", "neutral"]}]
    boto3.client("s3", endpoint_url=s3.endpoint_url).put_object(
        Bucket="detox-labels", Key="candidates/set1.jsonl", Body="\n".join(json.dumps(x) for x in lines))
    source = "s3://detox-labels/candidates/set1.jsonl"
    page = client.get("/detox/label", params={"source": source}, headers=auth(tokens, "viewer")).text
    item, candidates = item_of(page)
    assert len(candidates) == 3 and "rude &lt;b&gt;idiot&lt;/b&gt;" in page and "<b>idiot" not in page
    response = client.post("/detox/label", headers=auth(tokens, "viewer"),
                           json={"source": source, "item_id": item, "candidates": candidates, "ranking": [1, 1, 2]})
    assert response.status_code == 201
    record = next(r for r in label_objects(s3) if r["source_run"] == source)
    assert record["prompt"] == f"Summarize: {XSS}" and record["ranking"] == [1, 1, 2]


def test_training_needs_trigger_permission_and_runs_as_the_caller(world, monkeypatch):
    import detox_review_app

    client, tokens, s3 = world
    app = client.app
    calls = []

    def api_as_caller(request, caller_token):
        calls.append(caller_token)
        return TestClient(app, headers={"Authorization": f"Bearer {caller_token}"})

    monkeypatch.setattr(detox_review_app, "airflow_api", api_as_caller)
    runs = "/api/v2/dags/reward_model_train/dagRuns"
    before = client.get(runs, headers=auth(tokens, "admin")).json()["total_entries"]
    refused = client.post("/detox/train", headers=auth(tokens, "viewer"), json={})
    assert refused.status_code == 403 and not calls
    response = client.post("/detox/train", headers=auth(tokens, "trainer"), json={})
    assert response.status_code == 200, response.text
    assert calls == [tokens["trainer"]]  # Airflow's API was called with the trainer's own token
    started = response.json()
    listed = client.get(runs, headers=auth(tokens, "admin")).json()
    assert listed["total_entries"] == before + 1
    run = next(r for r in listed["dag_runs"] if r["dag_run_id"] == started["dag_run_id"])
    assert run["conf"]["preferences_source"] == started["preferences"]
    # The snapshot is every ranking so far, and reward_model_train can read it.
    assert started["records"] == len(label_objects(s3))
    pairs = load_pairs(started["preferences"])
    assert pairs.records == started["records"] and not pairs.problems

"""``detox``: every pipeline step from the command line, and the whole demo.

    detox demo                          # embedded default through Airflow, prints the outcome
    detox build-embedded                # only build the tiny models and data set
    detox run --run-id r1 --profile demo --set ppo.steps=5
    detox prepare-dataset --run-id r1 --profile demo   # ... one step at a time
    detox evaluate --model models:/detox-summarizer@champion   # audit a registered version
    detox reward-demo                   # reward_model_train on the embedded preferences, through Airflow
    detox reward-train --run-id rm1 --set data.source=s3://bucket/rankings.jsonl   # in this process
    detox up                            # Airflow, MLflow and S3 served on 127.0.0.1 until Ctrl-C (make up)
    detox serve --port 5001             # the registered champion behind POST /invocations
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tasks.config import ConfigError, RewardRunConfig, RunConfig

STEPS = (
    "prepare-dataset",
    "download-adapter",
    "baseline-eval",
    "ppo-train",
    "evaluate",
    "champion-eval",
    "promotion-check",
    "register-model",
    "skip-registration",
    "report",
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs with JSON values (``ppo.steps=5``, ``lora.target_modules=["q","v"]``)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


def load_config(args: argparse.Namespace, config_class=RunConfig):
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(read_config_file(args.config))
    overrides.update(parse_overrides(args.set))
    return config_class.for_profile(args.profile, overrides)


def read_config_file(path: str) -> dict[str, Any]:
    """The JSON object of config fields in ``path``; a :class:`ConfigError` naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--config {path}: not a readable JSON file ({err})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config fields, got {type(fields).__name__}")
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detox", description="PPO detoxification of a summarization model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser, config_class=RunConfig) -> None:
        sub.add_argument("--profile", choices=list(config_class.profiles()), default="production")
        sub.add_argument("--config", help="JSON file of config fields (nested or dotted keys)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")

    demo = commands.add_parser("demo", help="run the whole chain on the embedded default")
    demo.add_argument("--engine", choices=["airflow", "local"], default="airflow",
                      help="airflow: `airflow dags test` on SQLite; local: the same steps in this process")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    demo.add_argument("--family", choices=["seq2seq", "causal"], default="seq2seq",
                      help="seq2seq: the embedded T5 (FLAN-T5's family); causal: the embedded tiny Llama")

    reward_demo = commands.add_parser(
        "reward-demo", help="train and register a reward model from the embedded preference rankings")
    reward_demo.add_argument("--engine", choices=["airflow", "local"], default="airflow")
    reward_demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")

    reward = commands.add_parser("reward-train", help="every reward_model_train step in order, in this process")
    reward.add_argument("--run-id", required=True, help="names the run folder and the MLflow run")
    with_config(reward, RewardRunConfig)

    build = commands.add_parser("build-embedded", help="build the embedded default's data set and models")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")

    up = commands.add_parser("up", help="serve the embedded default: Airflow, MLflow, S3 on 127.0.0.1 until Ctrl-C")
    up.add_argument("--airflow-port", type=int, default=int(os.environ.get("DETOX_AIRFLOW_PORT", "8080")))
    up.add_argument("--mlflow-port", type=int, default=int(os.environ.get("DETOX_MLFLOW_PORT", "5000")))

    serve = commands.add_parser("serve", help="serve the registered champion (mlflow models serve) until Ctrl-C")
    serve.add_argument("--port", type=int, default=int(os.environ.get("DETOX_SERVE_PORT", "5001")))
    serve.add_argument("--model", default="detox-summarizer-demo", help="registered model name")
    serve.add_argument("--alias", default="champion")
    serve.add_argument("--tracking-uri", help="MLflow server (default: the running stack's, from stack.json)")

    run = commands.add_parser("run", help="every step in order, in this process")
    run.add_argument("--run-id", required=True, help="names the run folder and the MLflow run")
    with_config(run)

    for step in STEPS:
        sub = commands.add_parser(step, help=f"the {step} step")
        if step == "evaluate":
            sub.description = ("Evaluate this run's PPO candidate, or with --model any registered version "
                               "on the held-out set (an audit of the champion, say).")
            sub.add_argument("--model", metavar="URI", help="models:/<name>@<alias>, models:/<name>/<version> "
                             "or a version number of the profile's registered model")
            sub.add_argument("--run-id", help="names the run folder and the MLflow run (default with --model: "
                             "audit-<time>)")
        else:
            sub.add_argument("--run-id", required=True, help="names the run folder and the MLflow run")
        with_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = _dispatch(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        return _fail(err)
    except ConnectionError as err:
        if not isinstance(err, _unavailable_services()):
            raise
        return _fail(err)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _unavailable_services() -> tuple[type[ConnectionError], ...]:
    """S3 or the tracking server out of reach after their retries: worth one line, not a traceback."""
    from tasks.io.s3 import S3UnavailableError
    from tasks.registry.tracking import TrackingUnavailableError

    return S3UnavailableError, TrackingUnavailableError


def _fail(err: BaseException) -> int:
    """One line on stderr, as argparse reports a bad argument, and exit code 2."""
    print(f"detox: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def _dispatch(args: argparse.Namespace) -> dict | None:
    from tasks.steps import detox_retrain
    from tasks.steps.context import StepContext

    if args.command == "demo":
        from tasks.local.demo import run_demo

        report = run_demo(engine=args.engine, overrides=parse_overrides(args.set), family=args.family)
        print(format_report(report))
        return None
    if args.command == "reward-demo":
        from tasks.local.demo import demo_services, run_reward_pipeline

        with demo_services():
            return run_reward_pipeline(args.engine, parse_overrides(args.set))
    if args.command == "reward-train":
        from tasks.steps import reward_model_train

        config = load_config(args, RewardRunConfig)
        ctx = StepContext(run_key=args.run_id, dag_id="cli")
        return reward_model_train.run_all(config, ctx)
    if args.command == "up":
        from tasks.config import detox_home
        from tasks.local.stack import up

        up(detox_home(), args.airflow_port, args.mlflow_port)
        return None
    if args.command == "serve":
        from tasks.config import detox_home
        from tasks.local.stack import read_stack, serve

        serve(args.tracking_uri or read_stack(detox_home())["mlflow_url"], args.port, args.model, args.alias)
        return None
    if args.command == "build-embedded":
        from tasks.embedded.builds import build_embedded_default

        paths = build_embedded_default(seed=args.seed, force=args.force)
        return {name: str(value) for name, value in vars(paths).items()}

    config = load_config(args)
    if args.command == "evaluate" and args.model:
        from datetime import UTC, datetime

        run_key = args.run_id or f"audit-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
        return detox_retrain.evaluate_registered(config, StepContext(run_key=run_key, dag_id="cli"), args.model)
    if not args.run_id:
        raise ValueError(f"detox {args.command} needs --run-id")
    ctx = StepContext(run_key=args.run_id, dag_id="cli")
    if args.command == "run":
        return detox_retrain.run_all(config, ctx)
    return getattr(detox_retrain, args.command.replace("-", "_"))(config, ctx)


def format_report(report: dict) -> str:
    def number(key: str) -> str:
        value = report.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    low, high = report.get("toxicity_change_ci") or (None, None)
    interval = "n/a" if low is None or high is None else f"[{low:+.4f}, {high:+.4f}]"

    return "\n".join([
        "",
        "=== detox_retrain demo ===",
        f"run:                {report['run_key']} (MLflow run {report['mlflow_run_id']})",
        f"toxicity  before -> after: {number('toxicity_before')} -> {number('toxicity_after')}",
        f"toxicity change, paired bootstrap CI: {interval}",
        f"judge     before -> after: {number('judge_before')} -> {number('judge_after')} (independent of the reward)",
        f"ROUGE-L   before -> after: {number('rouge_l_before')} -> {number('rouge_l_after')}",
        f"decision:           {report.get('decision')} (failed checks: {report.get('failed_checks')})",
        f"registered model:   {report.get('model_uri')}",
    ])


if __name__ == "__main__":
    sys.exit(main())

"""Pipeline logic of the detox retraining workflow: plain Python, no Airflow imports.

Layers, each importing only from the layers below it (``tests/test_layout.py`` checks this):

    cli             the ``detox`` command
    local           the product on one machine: ``make demo``, ``make up``
    steps           the DAGs' steps and the review plugin's data
    evaluation  rewards  rl      measuring, reward models, PPO
    registry  embedded           MLflow tracking and registry; the demo's synthetic world
    io              files, S3, data sets, models
    config          the typed run config
    errors          the error every layer may raise
"""

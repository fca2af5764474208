"""The DAGs' steps: one module per DAG (``detox_retrain``, ``reward_model_train``), each step
callable from Airflow and from the ``detox`` command line with a :class:`~tasks.steps.context.StepContext`,
and the data behind the review plugin (``review``).

``dags/`` and ``plugins/`` import from here (and ``tasks.config``, ``tasks.errors``,
``tasks.io.connections``), not from the layers below.

May import: every layer below (``evaluation``, ``rewards``, ``rl``, ``registry``, ``io``, ``config``,
``errors``), but not ``embedded``: the demo's world is for ``tasks.local`` and ``tasks.cli`` only.
"""

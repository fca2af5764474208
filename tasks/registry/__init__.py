"""MLflow: one tracking run per DAG run (``tracking``), the model registry and its aliases
(``model_registry``), and the pyfunc a registered policy serves with (``serving``).

May import: ``tasks.io``, ``tasks.config``, ``tasks.errors``.
"""

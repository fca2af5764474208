"""Measuring a policy: the evaluation protocol (``protocol``), paired bootstrap intervals
(``stats``), the promotion gate (``gate``) and the run's report files (``reports``).

May import: ``tasks.registry``, ``tasks.io``, ``tasks.config``, ``tasks.errors``.
"""

"""Reward models from human preferences: ranking records to pairs (``preferences``), Bradley-Terry
training and held-out accuracy (``reward_model``), and the pyfunc a registered reward model
serves with (``serving``).

May import: ``tasks.registry``, ``tasks.io``, ``tasks.config``, ``tasks.errors``.
"""

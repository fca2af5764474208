"""The embedded default: a synthetic DialogSum-like world and the tiny models trained on it,
so that the demo and the tests run without the Hugging Face Hub.

Owns: the world's phrase and topic tables (``world/*.json``, package data) and the grammar that
combines them (``world``), and the builds of the policy, its SFT adapter and the hate-speech
classifier (``builds``), of the causal policy (``causal``) and of the preference set (``reward``).

May import: ``tasks.io``, ``tasks.config``, ``tasks.errors``.
"""

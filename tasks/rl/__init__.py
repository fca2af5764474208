"""PPO with a KL penalty through a LoRA adapter: the math as pure tensor functions
(``ppo_math``), the policy, its reference and value head (``policy``), the trainer (``trainer``),
and the accelerate worker processes of a multi-process run (``workers``).

May import: ``tasks.registry``, ``tasks.io``, ``tasks.config``, ``tasks.errors``.
"""

"""The product on one machine: the demo's services and engines (``demo``: ``make demo``) and the
served stack (``stack``: ``make up``). The ``detox`` command (``tasks.cli``) calls them.

May import: every layer below (all but ``tasks.cli``).
"""

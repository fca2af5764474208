"""Errors that say the run was given something wrong, as opposed to something failing."""


class InputError(Exception):
    """A config, data set, adapter or preference file that is wrong: running again cannot fix it,
    so the DAGs fail such a task at once instead of retrying it."""

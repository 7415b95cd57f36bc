"""The two kinds of failure the CLI distinguishes, mapped to exit codes 2 and 1."""


class UsageError(Exception):
    """Bad input from the user: a flag, a config field, a URI, a lake. Exit code 2."""


class JobError(Exception):
    """A job that started but could not finish. Exit code 1."""

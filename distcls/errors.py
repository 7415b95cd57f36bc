"""The two kinds of failure the CLI distinguishes, mapped to exit codes 2 and 1."""
from __future__ import annotations

import re


class UsageError(Exception):
    """Bad input from the user: a flag, a config field, a URI, a lake. Exit code 2."""


class JobError(Exception):
    """A job that started but could not finish. Exit code 1."""


def carried(exc: BaseException) -> UsageError | JobError | None:
    """The distcls error a Ray error carries, or None: its cause (a task's or actor's own error, as
    deep as Ray nested it), else the first one its text names. The text is all that is left when an
    exception chain crossed a process (Ray Data wraps a step's error in a UserCodeException whose
    cause is lost in pickling) or when Ray Train wrapped it (its str is the worker's traceback)."""
    seen: BaseException | None = exc
    for _ in range(16):  # a cause that is its own cause must not loop
        if seen is None:
            break
        inner = getattr(seen, "cause", None)  # Ray's wrapper, which is also an instance of its cause's class
        if inner is None and isinstance(seen, (UsageError, JobError)):
            return seen
        seen = inner
    named = re.search(r"distcls\.errors\.(JobError|UsageError): (.+)", str(exc))
    return (JobError if named.group(1) == "JobError" else UsageError)(named.group(2)) if named else None

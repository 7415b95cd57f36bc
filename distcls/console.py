"""Messages for people: every command logs under the ``distcls`` logger (``distcls.label``,
``distcls.train``, ...) to stderr, so that stdout carries only the command's product: its final
JSON summary, or the table of ``distcls runs`` / ``distcls models``. Ray's own output (worker and
actor logs forwarded to the driver, Ray Data's progress bars and plans) is turned down unless
``--verbose``, which also shows DEBUG lines. Progress is a line with a rate and an ETA: redrawn in
place on a terminal, logged every ``PROGRESS_EVERY_S`` otherwise (a CI log, ``ray job logs``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import time
import warnings
from typing import Iterator

LOGGER = "distcls"
PROGRESS_EVERY_S = 30.0

_verbose = False


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test's capture, say), as
    ``logging``'s own last-resort handler does."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _Plain(logging.Formatter):
    """``distcls: message``, with the level for warnings and errors; times and logger names only
    with --verbose, where they help to read interleaved lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if _verbose:
            return f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"distcls: {level}{message}"


def configure(verbose: bool = False) -> None:
    """Send the ``distcls`` loggers to stderr at INFO (DEBUG when ``verbose``). Idempotent: the
    CLI calls it once per command, tests once per call of ``cli.main``. Records still propagate
    to the root logger, which has no handler in the CLI (pytest's caplog adds one)."""
    global _verbose
    _verbose = verbose
    logger = logging.getLogger(LOGGER)
    logger.handlers = [handler for handler in logger.handlers if not isinstance(handler, _Stderr)]
    handler = _Stderr()
    handler.setFormatter(_Plain())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def verbose() -> bool:
    return _verbose


def ray_level() -> int:
    """Level of Ray's own loggers on the driver: its warnings too (say, that token authentication
    is on) are for --verbose; its errors always show."""
    return logging.DEBUG if _verbose else logging.ERROR


def quiet_ray() -> None:
    """Ray's driver-side output down to errors unless --verbose: Ray Data's progress bars, its
    execution plans and "execution finished" lines (its ``ray.data`` logger has a console handler
    of its own at INFO, see ``ray.data._internal.logging.DEFAULT_CONFIG``), its deprecation
    warnings. Worker and actor logs are a ``ray.init`` setting, ``log_to_driver``
    (``runtime.ensure_ray``). Not reachable from here: the C++ core worker writes its ERROR lines
    to the driver's stderr unconditionally (ray-project/ray#18577)."""
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    if not _verbose:  # about Ray's own API (e.g. map_batches' ray_remote_args), not the user's input
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = _verbose
    context.print_on_execution_start = _verbose
    logging.getLogger("ray").setLevel(ray_level())
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.INFO if _verbose else logging.ERROR)


# Ray's warning that a node started four times as many Python workers as it has CPUs: on a 2-CPU
# machine training runs do (its workers, their data coordinators, decode tasks and actors, ...),
# and it suggests causes ("tasks blocked in ray.get()") the user has nothing to do with. Whole
# lines only, as Ray's printer writes them (colour codes around the prefix): a line that another
# thread's text got into is kept.
_RAY_NOISE = re.compile(r"^(\x1b\[[0-9;]*m)?\(raylet\)(\x1b\[[0-9;]*m)? WARNING: \d+ PYTHON worker processes "
                        r"have been started on node")
_LONGEST_PENDING = 1 << 16  # characters of an unfinished line held back at most


class _Stray(io.TextIOBase):
    """A command's stdout while it runs: stderr, a line at a time, less _RAY_NOISE without
    --verbose. Says what stderr says about itself (a terminal? its descriptor, encoding), as Ray
    Data asks before drawing progress bars."""

    def __init__(self) -> None:
        self._pending = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stderr, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(sys.stderr, "errors", None)

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                if _verbose or not _RAY_NOISE.match(line):
                    sys.stderr.write(line + "\n")
            if len(self._pending) > _LONGEST_PENDING:
                self._write_pending()
        return len(text)

    def flush(self) -> None:
        """Also writes an unfinished line (a progress bar redrawn with \\r), unless it may be
        the start of Ray's noise."""
        with self._lock:
            if "(raylet)" not in self._pending:
                self._write_pending()
        sys.stderr.flush()

    def finish(self) -> None:
        """Write what is left of an unfinished last line, ending it."""
        with self._lock:
            if self._pending:
                self._pending += "\n"
                self._write_pending()
        sys.stderr.flush()

    def _write_pending(self) -> None:
        sys.stderr.write(self._pending)
        self._pending = ""


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """stdout is the command's product alone (its JSON summary). Ray prints the errors and warnings
    its nodes push to the driver (a worker killed for memory, a dead node) on sys.stdout, from a
    thread of its own, whatever log_to_driver says: while the command runs they go to stderr."""
    stray = _Stray()
    try:
        with contextlib.redirect_stdout(stray):
            yield
    finally:
        stray.finish()


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``done`` of ``total`` items with their rate and an ETA: a line redrawn in place when stderr
    is a terminal, else a log line at most every ``every_s`` seconds and one at the end."""

    def __init__(self, logger: logging.Logger, total: int, unit: str = "images",
                 every_s: float = PROGRESS_EVERY_S) -> None:
        self.logger, self.total, self.unit, self.every_s = logger, total, unit, every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + self.line(now) + "\033[K")
            sys.stderr.flush()
        elif now - self.last >= self.every_s:
            self.logger.info(self.line(now))
            self.last = now

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self.logger.info(self.line(time.monotonic()))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        bar = ("#" * int(20 * share)).ljust(20) if self.tty else ""
        return (f"{bar + '  ' if bar else ''}{self.done:,}/{self.total:,} {self.unit} ({share:.0%})  "
                f"{rate:.1f} {self.unit}/s  {duration(elapsed)} elapsed  ETA {eta}")

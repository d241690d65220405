"""Progress of a long run: one redrawn line on a terminal, plain lines in logs, log lines in between."""

from __future__ import annotations

import logging
import shutil
import time
from typing import TextIO

from backend.annotate.predict import log as predict_log


class Progress:
    """One redrawn line on a terminal; elsewhere (logs, CI) a plain line every `every` s or 10%."""

    def __init__(self, total: int, stream: TextIO, every: float = 10.0) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = 0.25 if self.tty else every
        self.todo = total  # shrinks as already-predicted tasks are found
        self.predicted = self.failed = self.skipped = 0
        self.started: float | None = None  # first batch handed out: rate and ETA count from there
        self.last_shown = 0.0
        self.last_step = -1
        self.drawn = False
        self.shown: tuple[int, int] | None = None  # (done, skipped) of the last line shown

    def begin(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def update(self, predicted: int = 0, failed: int = 0, skipped: int = 0) -> None:
        self.predicted += predicted
        self.failed += failed
        self.skipped += skipped
        self.todo -= skipped
        now = time.monotonic()
        step = int(10 * self.done / self.todo) if self.todo else 10
        timely = now - self.last_shown >= self.every and (self.done or self.skipped)
        if timely or (not self.tty and self.done and step > self.last_step):
            self.show()
            self.last_step = step

    @property
    def done(self) -> int:
        return self.predicted + self.failed

    def line(self) -> str:
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.todo - self.done)
        eta = duration(left / rate) if rate > 0 else "0s" if not left else "?"
        pct = 100.0 * self.done / self.todo if self.todo else 100.0
        bar = ""
        if self.tty:
            filled = int(20 * pct / 100)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        return (
            f"{bar}{self.done}/{self.todo} tasks ({pct:.0f}%)  {rate:.1f} tasks/s  ETA {eta}  "
            f"predicted {self.predicted}  failed {self.failed}  already predicted {self.skipped}"
        )

    def show(self) -> None:
        self.last_shown = time.monotonic()
        self.shown = (self.done, self.skipped)
        if self.tty:
            self.stream.write("\r" + self._fit(self.line()) + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write("  " + self.line() + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """A log line, without garbling the progress line."""
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(text.rstrip("\n") + "\n")
        if self.tty and self.drawn:
            self.stream.write(self._fit(self.line()) + "\x1b[K")
        self.stream.flush()

    @staticmethod
    def _fit(line: str) -> str:
        # a wrapped line can't be redrawn with \r: cut it to the terminal's width
        return line[: max(20, shutil.get_terminal_size((120, 24)).columns - 1)]

    def close(self) -> None:
        if self.shown != (self.done, self.skipped) and (self.done or self.skipped or self.shown):
            self.show()
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLog(logging.Handler):
    """Log lines to the progress stream, between progress lines."""

    def __init__(self, progress: Progress, verbose: bool) -> None:
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.progress, self.verbose = progress, verbose
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        # per-task "no prediction" lines are in the report at the end; shown as they happen with -v
        if not self.verbose and record.name == predict_log.name and str(record.msg).startswith("task %s"):
            return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.write(self.format(record))

"""Logging, configured once from ``main``: structlog for us, stdlib routed through it.

JSON lines on a non-terminal stdout (journald keeps them), colourless console
rendering on a terminal. paho's and libvirt's messages go through the same
pipeline, so one ``jq`` filter reads everything. Event names are stable and
dotted (``vcpu.transition``, ``libvirt.reconnect``): see docs/logging.md.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    *,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    out = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain tracebacks: structlog would format them with rich when it is
        # installed (the subscriber commands use it), but a log line is no UI.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


def get(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def stdlib(name: str) -> logging.Logger:
    """A stdlib logger for libraries that want one (paho); it joins our pipeline."""
    return logging.getLogger(name)


class LastingFault:
    """Logs a fault that lasts as three kinds of line, never one per occurrence.

    ``hit()`` on each occurrence: the first logs ``<event>`` at once (warning);
    while the fault lasts, at most one reminder every ``every`` seconds, with the
    occurrences counted since the last line; ``clear()`` logs ``<event>.ended``
    with the total and how long it lasted. A fault that repeats four times a
    second for an hour writes ~60 lines at the default pace, not 14,400.
    """

    def __init__(
        self,
        logger: structlog.stdlib.BoundLogger,
        event: str,
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.event = event
        self.every = every
        self._clock = clock
        self._started: float | None = None
        self._last_line = 0.0
        self._since_line = 0
        self.count = 0

    @property
    def active(self) -> bool:
        return self._started is not None

    def hit(self, **fields: object) -> None:
        now = self._clock()
        self.count += 1
        self._since_line += 1
        if self._started is None:
            self._started = self._last_line = now
            self._since_line = 0
            self._log.warning(self.event, **fields)
        elif now - self._last_line >= self.every:
            self._log.warning(
                self.event,
                ongoing=True,
                count=self._since_line,
                lasting_s=round(now - self._started, 1),
                **fields,
            )
            self._last_line = now
            self._since_line = 0

    def clear(self, **fields: object) -> None:
        if self._started is None:
            return
        lasted = self._clock() - self._started
        self._log.info(f"{self.event}.ended", count=self.count, lasted_s=round(lasted, 1), **fields)
        self._started = None
        self.count = 0
        self._since_line = 0

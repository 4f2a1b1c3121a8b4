"""structlog set-up for the daemon; only ``main`` calls it, once."""

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(level="info", stream=None):
    """Route structlog events at ``level`` and above to ``stream`` (stderr).

    Events render as JSON lines when the stream is not a terminal (journald,
    files), and in the console format when a person watches them.
    """
    stream = stream or sys.stderr
    renderer = (structlog.dev.ConsoleRenderer() if stream.isatty()
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )

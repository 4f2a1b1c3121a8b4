"""The skeleton's loggers: structlog, or a small stderr writer for the PAL.

Every container start loads the PAL library in a fresh process, and importing
structlog costs about 75 ms there (it pulls in asyncio), more than the whole
launch from the pool. So skeleton modules ask this module for a logger, and
the entry point decides what it writes to: Python programs (the demo, the
tests) get structlog, configured by them as usual; the PAL's entry point
(``skeleton.capi.entry``) calls ``use_stderr`` unless debug logging is on.
Both write an event name with key=value context.
"""

import os

# Levels by name, as rune passes them (enclave.runtime.loglevel).
LEVELS = {"trace": 10, "debug": 10, "info": 20, "warning": 30, "warn": 30,
          "error": 40, "fatal": 50, "panic": 50, "critical": 50,
          "off": 100}
_METHODS = ("debug", "info", "warning", "error", "critical")

_writer = None  # None: structlog


def level_number(name, default="info"):
    """The number of a level name; unknown or empty names mean ``default``."""
    return LEVELS.get((name or "").strip().lower(), LEVELS[default])


def use_stderr(level):
    """Write events at ``level`` (a number) and above to fd 2, one line each."""
    global _writer
    _writer = _StderrWriter(level)


def use_structlog():
    """Hand events to structlog, configured by the entry point."""
    global _writer
    _writer = None


def get_logger(name):
    """A logger with debug, info, warning, error and critical methods."""
    return _Logger(name)


class _Logger:
    def __init__(self, name):
        self._name = name

    def _emit(self, method, event, context):
        if _writer is not None:
            _writer.write(method, event, context)
            return
        import structlog
        getattr(structlog.get_logger(self._name), method)(event, **context)

    def __getattr__(self, method):
        if method not in _METHODS:
            raise AttributeError(method)
        return lambda event, **context: self._emit(method, event, context)


class _StderrWriter:
    """``[level] event key=value ...`` on fd 2, written by one write(2) each."""

    def __init__(self, level):
        self.level = level

    def write(self, method, event, context):
        if LEVELS[method if method != "critical" else "fatal"] < self.level:
            return
        fields = "".join(f" {key}={_value(value)}" for key, value in context.items())
        line = f"[{method}] {event}{fields}\n"
        try:
            os.write(2, line.encode(errors="replace"))
        except OSError:
            pass  # nowhere left to report it


def _value(value):
    text = str(value)
    if text and not any(c.isspace() or c in "\"'=" for c in text):
        return text
    return repr(text)

"""The server's loggers, which import `logging` only when a message is to be emitted.

`import logging` (with traceback, threading, string and weakref behind it) costs about 8 ms of
every server start here, and a mount that is not debugging usually logs nothing at all. A
`Logger` behaves as `logging.getLogger(name)` would:

- while nothing has imported `logging`, nothing can have configured it either, so the root
  logger is at WARNING: a message below WARNING is dropped without importing anything, as
  logging itself would drop it;
- a message at WARNING or above, or any message once `logging` is imported (by us or anyone
  else), goes to `logging.getLogger(name)`, after the configuration `setup` was given (the
  command line's level and format) has been applied, once.

`setup` with a level below WARNING (`-d`) configures logging at once: every request is logged.
The patched pyfuse3 has the same loggers (`pyfuse3._pyfuse3.LazyLogger`); `mount` has them call
`configure` too, so its messages come out in the same format.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40

_config: dict[str, Any] | None = None  # `logging.basicConfig` arguments, applied once
_applied = False


def setup(level: int, fmt: str) -> None:
    """Configure logging as `logging.basicConfig(level=LEVEL, format=FMT)` would, when it is
    first needed (at once when LEVEL is below WARNING)."""
    global _config, _applied
    _config = {"level": level, "format": fmt}
    _applied = False
    if level < WARNING or "logging" in sys.modules:
        configure()


def configure() -> Any:
    """The `logging` module, with the `setup` configuration applied."""
    global _applied
    import logging
    if not _applied and _config is not None:
        _applied = True
        logging.basicConfig(**_config)
    return logging


class Logger:
    """`logging.getLogger(NAME)`, looked up when a message is to be emitted."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, level: int, msg: str, args: tuple[Any, ...], exc_info: bool) -> None:
        if level < WARNING and "logging" not in sys.modules:
            return
        # stacklevel: the record names our caller, not this function
        configure().getLogger(self.name).log(level, msg, *args, exc_info=exc_info, stacklevel=3)

    def debug(self, msg: str, *args: Any) -> None:
        self._log(DEBUG, msg, args, False)

    def info(self, msg: str, *args: Any) -> None:
        self._log(INFO, msg, args, False)

    def warning(self, msg: str, *args: Any) -> None:
        self._log(WARNING, msg, args, False)

    def error(self, msg: str, *args: Any) -> None:
        self._log(ERROR, msg, args, False)

    def exception(self, msg: str, *args: Any) -> None:
        """`error` with the exception being handled (call it in an `except` block)."""
        self._log(ERROR, msg, args, True)

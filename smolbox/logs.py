"""Where smolbox's log lines go: the console (every command), a run's train.log, or JSON lines (serve.log_format).

All of it hangs off the "smolbox" logger, which does not propagate: some libraries configure the root logger,
and each line must print once.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

ROOT = "smolbox"
CONSOLE_FORMAT = logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S")
FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def use_console() -> logging.Logger:
    """smolbox's INFO lines on stderr (once, however often it is called)."""
    root = logging.getLogger(ROOT)
    if not _console_handlers(root):
        handler = logging.StreamHandler()
        handler.setFormatter(CONSOLE_FORMAT)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def log_to_file(path: Path) -> None:
    """Also write every line to `path` (a run's train.log), replacing the file an earlier call opened."""
    root = use_console()
    root.setLevel(logging.INFO)
    root.propagate = False
    for old in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(FILE_FORMAT)
    root.addHandler(handler)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields if it has any
    (smolbox.serve.access_log gives each request's)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        line.update(fields if fields else {"message": record.getMessage()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def use_json_lines() -> None:
    """Every smolbox and uvicorn log line as JSON on stderr (uvicorn is then started with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in (ROOT, "uvicorn"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

"""Values quoted by libraries' log records and warnings are withheld (patient data).

pydicom quotes an element's value when it warns about it ("Invalid value for VR UI: '...'"); a
UID whose length swallows the elements after it then puts the patient's name, ID and birth
date in the log. ``install()`` makes Python warnings log records (``py.warnings``) and filters
those and pydicom's own records: a quoted value stays only when it is a valid UID with a dot
(a birth date or an ID of digits alone is withheld).
"""

from __future__ import annotations

import logging
import re

from services.core.dicom.uids import validate_uid
from services.core.errors import InvalidUID

LIBRARY_LOGGERS = ("pydicom", "py.warnings")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def withhold_values(text: str) -> str:
    """``text`` with every quoted value that is not UID-like replaced by its length."""
    return _QUOTED.sub(lambda m: _loggable(m.group(0)[1:-1]), text)


def _loggable(value: str) -> str:
    """A valid UID with a dot stays (a date or an ID of digits alone does not)."""
    try:
        validate_uid(value)
    except InvalidUID:
        return f"<{len(value)} characters withheld>"
    return repr(value) if "." in value else f"<{len(value)} characters withheld>"


class WithholdValues(logging.Filter):
    """Rewrites a record's message with ``withhold_values`` (always lets it through)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = withhold_values(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_FILTER = WithholdValues()


def install() -> None:
    """Route warnings to logging and filter the libraries' loggers (idempotent)."""
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

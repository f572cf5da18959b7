"""Silence one library's log lines and Python warnings around a call whose chatter we do not act on.

Our report of a failure is one line; what a library logs or warns while we parse or unpickle a
checkpoint (transformers' notes about config defaults, torch's DeviceMesh warnings about process groups
that do not exist outside the job) would print before it.  What matters is checked by us and reported
in our own words, before or after the call.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quieted(logger_name: str) -> Iterator[None]:
    """``logger_name`` at ERROR and every warning ignored, for the ``with`` block only."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)

"""Errors of the schedule API in the spelling of the command line that caused them.

``make_schedule`` names its fixes by keyword (``pass chunks=2``, ``use microbatches=4``);
a ``twobp train`` or ``twobp simulate`` user typed flags, so the fix is shown as a flag
(``add --chunks 2``, ``use --microbatches 4``) that can be typed as it stands.
"""

from __future__ import annotations

import re

__all__ = ["as_flags"]

_SPELLING = (  # keyword spelling -> flag spelling, in this order (the first ones are the longer forms)
    (re.compile(r"make_schedule\('auto', \.\.\., layout='v'\)"), "auto with --layout v"),
    (re.compile(r"layout='v'"), "--layout v"),
    (re.compile(r"\bpass chunks=(\d+)"), r"add --chunks \1"),
    (re.compile(r"\bneeds chunks >="), "needs --chunks >="),
    (re.compile(r"\b(chunks|microbatches|stages)=(\d+)"), r"--\1 \2"),
)
_MEMORY_LIMIT = re.compile(r"\bmemory_limit=(\d+)")


def as_flags(message: str, *, memory_limit: str = "--memory-limit {}") -> str:
    """``message`` with make_schedule's keyword arguments written as flags. ``memory_limit``:
    how the command spells auto's cap (``twobp simulate``: ``--memory-limit N``; a job's
    schedule list: ``auto@N``)."""
    for pattern, flag in _SPELLING:
        message = pattern.sub(flag, message)
    return _MEMORY_LIMIT.sub(lambda m: memory_limit.format(m.group(1)), message)

"""Progress output of long jobs: one bar of our own, libraries' bars quiet under it.

A sweep shows a single line ("run 12 of 71", elapsed, time left). Inside a run, lm-eval,
``datasets`` and ``transformers`` would each draw their own bars (four per run for lm-eval
alone) and bury it; ``quiet_library_bars`` turns every tqdm bar created inside it off.
Log lines go through ``tqdm.write`` (``logging_redirect_tqdm``) so they never land on the
bar's line.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from tqdm import std
from tqdm.contrib.logging import logging_redirect_tqdm

SWEEP_FORMAT = "{desc}run {n_fmt} of {total_fmt} |{bar:20}| {elapsed} elapsed, ETA {remaining}{postfix}"


@contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Every tqdm bar created inside the block is disabled (tqdm's own class, so its subclasses too)."""
    original = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """The named loggers log at ``level`` or above inside the block (per-step chatter under a bar)."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


@contextmanager
def redirect_logging(enabled: bool = True) -> Iterator[None]:
    """Log records of the root logger's console handlers go through ``tqdm.write`` (when ``enabled``)."""
    with ExitStack() as stack:
        if enabled:
            stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()]))
        yield


def sweep_bar(total: int, enabled: bool = True) -> std.tqdm:
    """The sweep's one progress line: run N of M, elapsed and the estimated time left."""
    cols = shutil.get_terminal_size((120, 24)).columns
    return std.tqdm(total=total, bar_format=SWEEP_FORMAT, disable=not enabled, smoothing=0.1,
                    ncols=cols if cols > 0 else 120)  # a terminal that reports width 0 would hide the line

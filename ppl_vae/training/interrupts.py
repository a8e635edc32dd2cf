"""Ctrl-C during training: the first SIGINT is a request to stop before the next step (:class:`StopRequest`)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request to stop before the next training step.

    Training then stops with its run directory consistent (see :func:`ppl_vae.training.loop.train`); a
    second Ctrl-C raises ``KeyboardInterrupt`` at once. Where a handler cannot be set
    (outside the main thread) or SIGINT is ignored, nothing changes.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping before the next training step (press again to stop at once)", file=sys.stderr, flush=True)

"""Stopping a run on SIGTERM or SIGINT at a step every process agrees on.

Preemptible VMs (Cloud TPU, spot GPUs) announce an eviction with SIGTERM; Ctrl-C sends SIGINT. A
run that receives either finishes the step it is on, saves a checkpoint of it, flushes its
metrics and exits with :data:`EXIT_STATUS`; the same command then resumes from that checkpoint.

- One process: the signal sets a flag, read after every step.
- Several processes: all must stop after the same step, or one would wait forever in the save of a
  step the others never reach. JAX's preemption sync manager (started by
  ``jax.distributed.initialize``) catches SIGTERM in any process and agrees with the others on a
  step a little ahead, the first at which every process can still stop
  (``multihost_utils.reached_preemption_sync_point``, which orbax's ``reached_preemption`` calls).
  SIGINT is turned into a SIGTERM to this process so that it takes the same path.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# "Temporary failure, retry" (sysexits.h EX_TEMPFAIL): stopped cleanly, resume by rerunning.
EXIT_STATUS = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A signal's handler as `signal.signal` takes and returns it: a function, SIG_DFL or SIG_IGN, or
# None (a handler not installed from Python).
_Handler = Callable[[int, FrameType | None], Any] | int | None


class StopRequested(Exception):
    """Raised after the checkpoint of ``step`` was saved because ``signal_name`` asked to stop."""

    def __init__(self, step: int, signal_name: str, checkpoint_dir: str) -> None:
        self.step = step
        self.signal_name = signal_name
        self.checkpoint_dir = checkpoint_dir
        super().__init__(
            f"stopped by {signal_name} after step {step}: checkpoint saved in "
            f"{checkpoint_dir}/{step}; run the same command again to resume from it"
        )


def _multi_process() -> bool:
    import jax

    return jax.process_count() > 1


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT request a stop instead of killing the
    process; :meth:`should_stop` says, after a step, whether to save and stop there.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, _Handler] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signal.Signals(signum).name

    def _forward_to_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        if _multi_process():
            # JAX's preemption notifier holds SIGTERM; a Python handler would take it away.
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_to_sigterm)
        else:
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step`` (the same answer on every process). Call it after every
        step, on every process."""
        if not _multi_process():
            return self.received is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "SIGTERM"
            return True
        return False

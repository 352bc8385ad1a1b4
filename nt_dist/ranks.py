"""What the ranks of one job agree on: the run folder's claim, an error met on any rank, a
non-finite loss on any rank, a stop signal, and the one line that ends the job.

Every rank of an ``accelerate launch`` job meets the same recipe and the same files, but the
launcher stops all ranks as soon as one exits, and a rank that fails alone would leave the
others waiting in a collective. So the main process decides what it alone can decide (the run
folder's lock) and tells the others; an error met on one rank ends every rank; and the final
line is printed once, by rank 0.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nt_dist import rundir
from nt_dist.config import Recipe
from nt_dist.errors import RunError, UserError, say


def claim_folder(accelerator: Any, recipe: Recipe, source: str) -> rundir.RunLock | None:
    """The main process locks and prepares the run folder; every rank learns the outcome, so a
    refusal ends all of them with the same line instead of leaving some in a collective."""
    lock, problem = None, ""
    if accelerator.is_main_process:
        try:
            lock, _ = rundir.claim(recipe, source)
        except UserError as exc:
            problem = str(exc)
    problem = agree(accelerator, problem)
    if problem:
        raise UserError(problem)
    return lock


def agree(accelerator: Any, value: Any) -> Any:
    """The main process's ``value``, on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def on_every_rank(accelerator: Any, make: Callable[[], Any]) -> Any:
    """``make()`` on every rank; a UserError on any rank (a bad file in its share of the data)
    ends every rank with that line, instead of leaving the others waiting in a collective."""
    problem, value = "", None
    try:
        value = make()
    except UserError as exc:
        if accelerator.num_processes == 1:
            raise
        problem = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problem = next((p for p in gather_object([problem]) if p), "")
    if problem:
        raise UserError(problem)
    return value


class Preemption:
    """SIGTERM/SIGUSR1 (a scheduler's warning) and SIGINT (Ctrl-C) set a flag; the loop
    checkpoints at the next step boundary and exits with ``EXIT_PREEMPTED`` (130 for Ctrl-C).
    A second Ctrl-C stops at once. All ranks agree through one all-reduce per step.

    A launcher that is stopped kills its workers a few seconds after it forwards the signal
    (accelerate: 5 s), and one step can take longer than that: ``on_stall`` is called once,
    from a watchdog thread, when the step boundary has not been reached ``stall_s`` after the
    signal (the run tells MLflow it was KILLED, so no store keeps a RUNNING run whose process is
    gone). Called from a thread, not from the handler: a handler interrupts the main thread
    wherever it is, perhaps holding the very lock the call needs."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, on_stall: Callable[[], None] | None = None, stall_s: float = 2.0) -> None:
        self.requested = False
        self.interrupted = False
        self.on_stall, self.stall_s = on_stall, stall_s
        self._previous: dict[int, Any] = {}
        self._signalled_at = 0.0
        self._watching = False

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.on_stall is not None:
            import threading

            self._watching = True
            threading.Thread(target=self._watch, name="nt-dist-preemption", daemon=True).start()

    def uninstall(self) -> None:
        self._watching = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _watch(self) -> None:
        while self._watching:
            time.sleep(0.2)
            if self._signalled_at and time.monotonic() - self._signalled_at >= self.stall_s and self._watching:
                self._watching = False
                if self.on_stall is not None:
                    self.on_stall()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        self.requested = True
        self._signalled_at = self._signalled_at or time.monotonic()

    def agreed(self, accelerator: Any) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


REPORT_GRACE_S = 30.0


def launched() -> tuple[int, int]:
    """``(rank, world size)`` as the launcher (accelerate launch, torchrun) set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def last_line(line: str, code: int) -> int:
    """Print the run's last line once for the whole job. Every rank meets the same error, but
    the launcher stops the other ranks as soon as one exits: a rank other than 0 leaves the
    report to rank 0 and waits to be stopped, and reports itself only if that does not happen
    within ``REPORT_GRACE_S`` (an error of its own)."""
    if launched()[0] != 0:
        try:
            time.sleep(REPORT_GRACE_S)
        except KeyboardInterrupt:
            return code
    say(line)
    return code


class NonFiniteLoss(RunError):
    pass


def check_finite(acc: Any, window: list[tuple[int, dict[str, Tensor]]], epoch: int) -> None:
    """One host sync per window: find the first step whose loss is NaN/Inf and name it with
    its parts. Ranks agree (one all-reduce), so none is left waiting in a collective."""
    losses = torch.stack([parts["loss"].float() for _, parts in window])
    bad = (~torch.isfinite(losses)).any().float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() == 0:
        return
    for (step, parts), loss in zip(window, losses.tolist(), strict=True):
        if not math.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch + 1}): {detail}")
    raise NonFiniteLoss(f"non-finite loss on another process by step {window[-1][0]} (epoch {epoch + 1})")

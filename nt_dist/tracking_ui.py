"""``nt-dist ui``'s server: MLflow's in a process group of its own, its address printed once it
answers, stopped with every process it started when ``nt-dist ui`` is stopped (Ctrl-C, SIGTERM,
SIGHUP), and its port recorded beside the store for the closing line of later runs.

``mlflow ui`` starts a uvicorn (or gunicorn) worker of its own; a signal to ``mlflow`` alone
left that worker answering, so the whole group is signalled (``os.killpg``), then killed after
:data:`STOP_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from nt_dist.errors import RunError, UserError, say

DEFAULT_UI_PORT = 5000  # `nt-dist ui --port`'s default
UI_RECORD = ".nt-dist-ui.json"  # beside mlflow.db: the host and port `nt-dist ui` last served the store on
START_TIMEOUT_S = 180.0  # a fresh SQLite store migrates its schema first; /health answered after ~20 s here
STOP_GRACE_S = 10.0  # SIGTERM to the group, then SIGKILL
POLL_S = 0.25


def url_host(host: str) -> str:
    """The address a browser on this machine uses for a server listening on ``host``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{shown}]" if ":" in shown else shown


def answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether MLflow's ``/health`` at ``host:port`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{url_host(host)}:{port}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def listening(host: str, port: int) -> bool:
    """Whether anything accepts connections at ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((url_host(host).strip("[]"), port), timeout=1):
        return True
    return False


def record_ui(folder: Path, host: str, port: int) -> None:
    """Note where the store in ``folder`` is served (a convenience: an unwritable folder goes unnoted)."""
    with contextlib.suppress(OSError):
        (folder / UI_RECORD).write_text(json.dumps({"host": url_host(host), "port": port}) + "\n", encoding="utf-8")


def recorded_ui(folder: Path) -> tuple[str, int] | None:
    """(host, port) that ``nt-dist ui`` last served the store in ``folder`` on; None if never."""
    try:
        record = json.loads((folder / UI_RECORD).read_text(encoding="utf-8"))
        return str(record["host"]), int(record["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Stop(Exception):
    """SIGTERM or SIGHUP: end like Ctrl-C."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _handle(handler: object) -> dict[int, object]:
    """Set ``handler`` for SIGTERM and SIGHUP (and SIGINT, unless it raises :class:`_Stop`);
    return the previous handlers. Signals reach handlers in the main thread only: elsewhere, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        if sig != signal.SIGINT or handler is not _raise_stop:  # SIGINT raises KeyboardInterrupt already
            signal.signal(sig, handler)  # type: ignore[arg-type]
    return previous


def serve(start: Callable[[], subprocess.Popen], folder: Path, host: str, port: int, lines: list[str],
          timeout: float = START_TIMEOUT_S) -> int:
    """Start an MLflow server on ``host:port`` for the store in ``folder`` (``start``: a process
    in a session of its own, ``start_new_session=True``); print ``lines`` on stderr once
    ``/health`` answers; return when it exits or nt-dist ui is stopped (Ctrl-C, SIGTERM, SIGHUP),
    with the whole group stopped."""
    if listening(host, port):
        raise UserError(f"--port: {port}: something already listens on {url_host(host)}:{port}; "
                        "stop it or pass another --port")
    previous = _handle(_raise_stop)  # their default ends the process at once, leaving the group running
    try:
        say(f"nt-dist ui: starting the MLflow server on port {port} ...")
        proc = start()
        try:
            _wait_until_answering(proc, host, port, timeout)
            record_ui(folder, host, port)
            print("\n".join(lines), file=sys.stderr, flush=True)
            return proc.wait()
        except (KeyboardInterrupt, _Stop):
            return 0
        finally:
            _handle(signal.SIG_IGN)  # a second Ctrl-C must not cut the group's stop short
            stop_group(proc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _wait_until_answering(proc: subprocess.Popen, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not answers(host, port):
        code = proc.poll()
        if code is not None:
            raise RunError(f"the MLflow UI exited (code {code}) before answering on port {port}; "
                           "its messages are above")
        if time.monotonic() > deadline:
            raise RunError(f"the MLflow UI did not answer on port {port} within {timeout:.0f} s; it was stopped")
        time.sleep(POLL_S)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left of it after ``grace`` seconds."""
    group = proc.pid  # start_new_session: the group's id is the leader's pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc, group):
            time.sleep(0.1)
        if not _group_alive(proc, group):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _group_alive(proc: subprocess.Popen, group: int) -> bool:
    proc.poll()  # reap the leader: a zombie would count as alive
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

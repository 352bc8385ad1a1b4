"""An MLflow store that may not answer: every call a command makes before it knows the store is
there is bounded (``tracking.timeout_s``), and what goes wrong is one line naming the store.

MLflow's own HTTP limits bound each attempt of each request, not a call, and retry seven times
with backoff: a server that is gone, or one that accepts connections and never answers, would
cost minutes of silence.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from nt_dist.errors import UserError, one_line

T = TypeVar("T")


def store_file(uri: str) -> Path | None:
    """A SQLite store's database file (absolute); None for servers."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve()


def bound_requests(timeout_s: float) -> None:
    """MLflow's HTTP defaults (7 retries with exponential backoff, 120 s a request) turn a dead
    server into minutes of silence: one retry, and a request timeout that lets two attempts fit
    in ``timeout_s``. Set only where the user has not set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, min(10, int(timeout_s // 2)))))


class NoAnswer(TimeoutError):
    """An MLflow call that had not returned when its time was up."""


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``, waited for at most ``seconds`` (:class:`NoAnswer` after that). MLflow's HTTP
    timeouts bound each attempt of each request, not a call: a server that accepts connections
    and never answers costs a call minutes. The call runs on a daemon thread, left behind on
    timeout: it ends with its request, or with the process."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="nt-dist-mlflow-call", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        raise NoAnswer(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def network_failure(exc: BaseException) -> str | None:
    """Why a store did not answer (``connection refused``, ``timed out``, a name that does not
    resolve), read from the innermost network error of ``exc``'s chain (MLflow wraps requests,
    which wraps urllib3, which wraps the socket's error); None when ``exc`` is no network failure
    (a missing local file is an OSError too, and no reason to call a server silent)."""
    import socket

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    reason = None
    for error in chain:  # outermost first: the last match is the socket's own error
        if isinstance(error, NoAnswer):
            return str(error)
        if isinstance(error, (ConnectionError, socket.gaierror, socket.herror)) and error.strerror:
            reason = error.strerror.lower()
        elif isinstance(error, TimeoutError) or type(error).__name__.endswith(("Timeout", "TimeoutError")):
            reason = "timed out"
        elif type(error).__module__.startswith(("requests.", "urllib3.")) and reason is None:
            reason = "connection failed"
    return reason


@contextmanager
def store_errors(uri: str, hint: str = "") -> Iterator[None]:
    """An MLflow store that fails a call becomes one :class:`UserError` naming ``uri``: the
    network's reason (and ``hint``) when it did not answer, MLflow's own first line when it
    refused."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = network_failure(exc)
        if reason is not None:
            raise UserError(f"MLflow at {uri} is not answering ({reason}){hint}") from None
        if isinstance(exc, MlflowException):
            first = str(exc.message).strip().splitlines()[0] if str(exc.message).strip() else type(exc).__name__
            raise UserError(f"MLflow at {uri}: {one_line(first)}") from None
        raise


def contact(uri: str, timeout_s: float, call: Callable[[], T], hint: str = "") -> T:
    """A command's first MLflow call, bounded by ``timeout_s`` (``tracking.timeout_s``): a store
    that is not there ends the command in one line instead of minutes of retries."""
    bound_requests(timeout_s)
    with store_errors(uri, hint):
        return within(timeout_s, call)


def timeout_default() -> float:
    """``tracking.timeout_s`` of a recipe that does not set it: the report reads no recipe."""
    from nt_dist.config import TrackingConfig

    return TrackingConfig().timeout_s


def check_store(uri: str) -> None:
    """What ``nt-dist check`` says of a SQLite store that is not one, before MLflow is asked."""
    from nt_dist.preflight import check_sqlite_file

    database = store_file(uri)
    if database is not None:
        check_sqlite_file(database, "MLflow store")

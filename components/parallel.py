"""Process pools that are safe to start from a threaded process.

Stages run under Prefect and MLflow, which start threads; forking a threaded process can copy a lock that another
thread holds, and the child then hangs. `mp_context()` forks while the process is single-threaded (cheap: nothing is
re-imported) and uses a forkserver otherwise.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Sequence


def mp_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """fork when this process runs one thread, else forkserver with `preload` modules imported once in the server."""
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx


def adopt_environ(environ: dict[str, str]) -> None:
    """Pool initializer: a forkserver child inherits the environment of the server's start, not the caller's current
    one (which may since point AWS_ENDPOINT_URL or credentials elsewhere), so it takes the caller's."""
    os.environ.clear()
    os.environ.update(environ)

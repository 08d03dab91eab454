"""One long-running server process: started in its own session, logged to a file, stopped with a timeout.

A `ServiceProcess` may be stopped by the process that started it (tests) or by a later one that only has the pid file
(`python -m infra.services stop`). The pid file records the process' start time, so a pid reused by an unrelated
process after a reboot is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

READY_POLL_S = 0.25


class ServiceError(RuntimeError):
    """A server that did not start or stop; the message names it and quotes its log's tail."""


class ServiceProcess:
    """A server process in its own process group, its output in `<state_dir>/<name>.log`.

    Args:
        name: Short name (`seaweedfs`, `mlflow`, ...), used for the log and pid files.
        state_dir: Folder of the log and pid files.
        stop_timeout_s: How long `stop` waits after SIGTERM before it SIGKILLs the whole process group.
    """

    def __init__(self, name: str, state_dir: Path, *, stop_timeout_s: float = 10.0) -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        self.stop_timeout_s = stop_timeout_s
        self._popen: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    # -- start -----------------------------------------------------------------------------------------------------

    def start(self, cmd: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None) -> None:
        """Starts `cmd` with exactly `env` in a new session (so the whole group can be signalled), appending to the log.

        Raises:
            ServiceError: This service is already running according to its pid file.
        """
        if self.running():
            raise ServiceError(f"{self.name} is already running (pid {self.pid()}); stop it first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: {cmd[0]}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = psutil.Process(self._popen.pid)
        self.pid_path.write_text(json.dumps({"pid": proc.pid, "create_time": proc.create_time()}))

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> None:
        """Polls `probe` until it returns True.

        Raises:
            ServiceError: The process exited, or `timeout_s` passed; the message quotes the log's tail.
        """
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(f"{self.name} exited during start-up; log tail:\n{self.log_tail()}")
            try:
                if probe():
                    return
            except Exception as err:  # noqa: BLE001 - a probe fails in many ways until the server is up
                last_error = err
            time.sleep(READY_POLL_S)
        raise ServiceError(
            f"{self.name} not ready after {timeout_s:.0f} s (last probe error: {last_error}); log tail:\n"
            f"{self.log_tail()}"
        )

    # -- state -----------------------------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of the running server (this process' child or the pid file's), or None."""
        proc = self._process()
        return proc.pid if proc else None

    def running(self) -> bool:
        return self._process() is not None

    def _process(self) -> psutil.Process | None:
        if self._popen is not None:
            return None if self._popen.poll() is not None else psutil.Process(self._popen.pid)
        try:
            record = json.loads(self.pid_path.read_text())
            proc = psutil.Process(int(record["pid"]))
            # A pid reused by another process has another start time; a zombie has exited.
            if abs(proc.create_time() - float(record["create_time"])) > 1e-3 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (OSError, ValueError, KeyError, psutil.Error):
            return None

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return "<no log>"

    # -- stop ------------------------------------------------------------------------------------------------------

    def stop(self, timeout_s: float | None = None) -> bool:
        """SIGTERM to the process group, then SIGKILL to the group after the timeout. True if something was running."""
        proc = self._process()
        if proc is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        # The group of the session started in `start`: the server and every child it spawned (uvicorn workers, ...).
        pgid = proc.pid
        members = [proc, *_children(proc)]
        _signal_group(pgid, signal.SIGTERM)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        else:
            psutil.wait_procs(members, timeout=timeout)
        _signal_group(pgid, signal.SIGKILL)  # stragglers: a server ignoring SIGTERM, or children that outlived it
        for member in members:  # children that left the group still die
            with contextlib.suppress(psutil.Error):
                member.kill()
        if self._popen is not None:
            self._popen.wait()
        psutil.wait_procs(members, timeout=5)
        self._popen = None
        self.pid_path.unlink(missing_ok=True)
        return True


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

"""Running the target where it cannot take the run down with it.

Each task (the tiers of one op) runs in a forked worker process that streams JSON messages back over a
pipe: ``{"beat": [tier, label]}`` before every call of the target, ``{"result": {...}}`` per case,
``{"crash": "..."}`` when the target raised a BaseException (``sys.exit``, KeyboardInterrupt) and
``{"done": true}``. The parent waits at most ``timeout`` seconds for each message; a worker that
falls silent (a hang) or ends (``os._exit``, a segfault) is killed, the case it was on is reported as
lost, and the next task starts in a fresh worker. The worker is forked, so targets built in memory
(closures, test doubles) need no pickling, and it is reused across tasks so JIT caches stay warm.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: run_task(task, beat, emit): run one task; beat(tier, label) before each target call, emit(result dict)
RunTask = Callable[[dict[str, Any], Callable[[str, str], None], Callable[[dict[str, Any]], None]], None]


@dataclass
class Lost:
    """What happened (``what``: it hung, ended the process, raised a BaseException) at ``tier`` / ``label``."""

    tier: str
    label: str
    what: str


class _Worker:
    def __init__(self, run_task: RunTask) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=self._main, args=(child, run_task), daemon=True)
        self.proc.start()
        child.close()

    @staticmethod
    def _main(conn: Any, run_task: RunTask) -> None:
        if "torch" in sys.modules:  # an OpenMP pool does not survive fork: one intra-op thread in the worker
            sys.modules["torch"].set_num_threads(1)

        def send(msg: dict[str, Any]) -> None:
            conn.send_bytes(json.dumps(msg, default=str).encode())

        while True:
            try:
                task = json.loads(conn.recv_bytes())
            except EOFError:
                os._exit(0)
            try:
                run_task(task, lambda tier, label: send({"beat": [tier, label]}), lambda r: send({"result": r}))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt and friends raised by the target
                send({"crash": f"{type(exc).__name__}: {exc}"})
            send({"done": True})

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class Executor:
    """Runs tasks in a forked worker (``isolate``, where fork exists) or in this process."""

    def __init__(self, run_task: RunTask, timeout: float, isolate: bool) -> None:
        self.run_task, self.timeout = run_task, timeout
        self.isolate = isolate and "fork" in multiprocessing.get_all_start_methods()
        self.worker: _Worker | None = None

    def run(self, task: dict[str, Any]) -> tuple[list[dict[str, Any]], Lost | None, Lost | None]:
        """(results, the case lost if the worker died or hung, the case where the target raised a BaseException)."""
        results: list[dict[str, Any]] = []
        if not self.isolate:
            self.run_task(task, lambda tier, label: None, results.append)
            return results, None, None
        if self.worker is None:
            self.worker = _Worker(self.run_task)
        w, where, crash = self.worker, ["*", "*"], None
        w.conn.send_bytes(json.dumps(task).encode())
        while True:
            if not w.conn.poll(self.timeout):
                return results, self._lose(where, f"did not return within {self.timeout:g} s (--timeout)"), crash
            try:
                msg = json.loads(w.conn.recv_bytes())
            except (EOFError, OSError):
                w.proc.join(5)
                return (
                    results,
                    self._lose(
                        where,
                        f"ended the process (exit code {w.proc.exitcode}); a target must return or raise an Exception",
                    ),
                    crash,
                )
            if "beat" in msg:
                where = msg["beat"]
            elif "result" in msg:
                results.append(msg["result"])
            elif "crash" in msg:
                crash = Lost(where[0], where[1], f"raised {msg['crash']}")
            else:
                return results, None, crash

    def _lose(self, where: list[str], what: str) -> Lost:
        self.close()
        return Lost(where[0], where[1], what)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

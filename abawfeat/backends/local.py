"""The local backend: units in this process (one job) or in ``jobs`` spawned worker processes.

With several jobs the parent owns its workers' lives: SIGTERM and SIGINT sent to it reach every worker, it
waits for them, and no worker outlives the command (a worker left behind would keep training beside a re-run
of the same grid)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from abawfeat.backends import BACKENDS, BackendOptions, threads_text
from abawfeat.backends.unit import UnitResult, UnitSpec, quiet_worker, train_unit
from abawfeat.errors import ConfigError


class LocalBackend:
    name = "local"

    def __init__(self, options: BackendOptions) -> None:
        if options.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1 (or 0 = auto), not {options.jobs}")
        self.jobs = options.jobs

    def run(self, specs: Sequence[UnitSpec], say: Callable[[str], None]) -> list[UnitResult]:
        if self.jobs == 1 or len(specs) <= 1:
            out = []
            for spec in specs:
                say(f"{spec.name}: training into {spec.run_dir}")
                out.append(train_unit(spec, say))
            return out
        return self._run_processes(specs, say)

    def _run_processes(self, specs: Sequence[UnitSpec], say: Callable[[str], None]) -> list[UnitResult]:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        # spawn, not fork: the parent may already run torch threads, which a forked child would inherit
        # broken. One unit per process: a process that trained a VA cell keeps its freed memory, and the next
        # cell's would pile on top; a fresh process costs a few seconds of imports.
        ctx = mp.get_context("spawn")
        queue = list(enumerate(specs))
        results: list[UnitResult | None] = [None] * len(specs)
        running: dict[Any, tuple[Any, int, UnitSpec]] = {}  # result pipe -> (process, index, spec)
        with _forwarded_signals(lambda: [p for p, _, _ in running.values()]):
            try:
                while queue or running:
                    while queue and len(running) < self.jobs:
                        index, spec = queue.pop(0)
                        # The unit's own thread count (its configuration), whatever the number of jobs.
                        say(f"{spec.name}: queued for {spec.run_dir} ({threads_text(spec)}, "
                            f"{self.jobs} jobs)")
                        receive, send = ctx.Pipe(duplex=False)
                        proc = ctx.Process(target=_unit_worker, args=(send, spec))
                        proc.start()
                        send.close()
                        running[receive] = (proc, index, spec)
                    for ready in wait(list(running)):
                        proc, index, spec = running.pop(ready)
                        try:
                            result = ready.recv()
                        except (EOFError, OSError):
                            result = UnitResult(name=spec.name, run_dir=str(spec.run_dir), status="failed",
                                                error=f"its worker process ended with code {proc.exitcode}")
                        ready.close()
                        proc.join()
                        results[index] = result
            finally:
                # However the parent leaves (a signal, an error), no worker outlives it: each is told to
                # stop the way the parent was, then waited for.
                _stop_workers([p for p, _, _ in running.values()])
        return [r for r in results if r is not None]


_interrupted = False  # set in a worker process by its first SIGTERM or SIGINT


def _unit_worker(send: Any, spec: UnitSpec) -> None:
    """A worker process: one unit, its result sent back. SIGTERM stops it as Ctrl-C does (the run stays
    interrupted and resumable, its staged replacement removed); either ends it quietly, without a traceback,
    since the parent reports the interruption once."""
    import signal

    quiet_worker()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_interrupt)
    try:
        send.send(train_unit(spec))
    except BaseException:
        # Interrupted, whatever the exception became: a KeyboardInterrupt raised inside a library's clean-up
        # (numpy's zip writer closing a half-written file) can surface as that library's own error instead.
        if _interrupted:
            os._exit(130)
        raise
    finally:
        send.close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    """The first SIGTERM or SIGINT interrupts the worker; later ones (Ctrl-C reaches it both from the
    terminal and through the parent) are ignored, so the run's own clean-up is not cut short."""
    import signal

    global _interrupted
    _interrupted = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        # A handler that does nothing, not SIG_IGN: a second signal already pending would otherwise be
        # reported by Python as "ignored due to race condition", with a traceback.
        signal.signal(sig, _ignore_signal)
    raise KeyboardInterrupt


def _ignore_signal(signum: int, frame: Any) -> None:
    return None


class _forwarded_signals:
    """While the parent runs workers, SIGTERM and SIGINT reach every worker too (a SIGTERM sent to the
    parent alone, by a scheduler or ``kill``, would otherwise leave them training), and the parent stops
    as for Ctrl-C (``KeyboardInterrupt``: one ``interrupted:`` line). Only in the main thread, where Python
    lets a handler be set."""

    def __init__(self, workers: Callable[[], list[Any]]) -> None:
        self.workers = workers
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _forwarded_signals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def _forward(self, signum: int, frame: Any) -> None:
        for proc in self.workers():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _stop_workers(procs: list[Any], grace: float = 30.0) -> None:
    """Wait for workers already told to stop (SIGTERM them if they were not), killing any still there after
    ``grace`` seconds: a worker left behind would keep training beside a re-run of the grid."""
    import signal

    for proc in procs:
        if proc.exitcode is None and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()


BACKENDS.add("local", LocalBackend)

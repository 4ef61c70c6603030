"""The local backend: units in this process (one job) or in ``jobs`` spawned worker processes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

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
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may already run torch threads, which a forked child would inherit
        # broken. One unit per process (Python >= 3.11): a process that trained a VA cell keeps its freed
        # memory, and the next cell's would pile on top; a fresh process costs a few seconds of imports.
        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=quiet_worker, **fresh) as pool:
            futures = []
            for spec in specs:
                # The unit's own thread count (its configuration), whatever the number of jobs.
                say(f"{spec.name}: queued for {spec.run_dir} ({threads_text(spec)}, {self.jobs} jobs)")
                futures.append(pool.submit(train_unit, spec))
            return [f.result() for f in futures]


BACKENDS.add("local", LocalBackend)

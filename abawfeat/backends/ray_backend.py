"""The Ray backend: each unit a Ray task on a running cluster (``ray_address``) or on a local one started
for the grid with ``jobs`` CPUs. A task asks for its unit's thread count in CPUs and ``gpus_per_run`` GPUs
(``0.25`` packs four heads on one GPU); a task whose worker process died is run again (``max_retries``),
and ``train_unit`` resumes the run from its last finished epoch. Ray is an optional extra
(``pip install 'abawfeat[ray]'``): its wheel is large (docs/cluster.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from abawfeat.backends import BACKENDS, BackendOptions
from abawfeat.backends.unit import UnitResult, UnitSpec, quiet_worker, train_unit
from abawfeat.errors import ConfigError


def _ray_unit(spec: UnitSpec) -> UnitResult:
    quiet_worker()
    return train_unit(spec)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray: Ray is not installed; pip install 'abawfeat[ray]' (or the ray "
                          "version constraints.txt pins)") from None
    return ray


class RayBackend:
    name = "ray"

    def __init__(self, options: BackendOptions) -> None:
        if options.gpus_per_run < 0:
            raise ConfigError(f"--gpus-per-run must be >= 0, not {options.gpus_per_run}")
        if options.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, not {options.max_retries}")
        self.options = options

    def connect(self) -> tuple[Any, bool]:
        """Ray, connected; True when this call started (and so must stop) the cluster."""
        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        address = self.options.ray_address
        _check_reachable(address)
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(num_cpus=max(1, self.options.jobs), include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--ray-address {address or '(local)'}: cannot connect to a Ray cluster: "
                              f"{first}") from None
        return ray, True

    def run(self, specs: Sequence[UnitSpec], say: Callable[[str], None]) -> list[UnitResult]:
        if not specs:
            return []
        ray, started = self.connect()
        try:
            task = ray.remote(_ray_unit)
            refs = []
            for spec in specs:
                options = {"num_cpus": spec.config.threads or 1, "num_gpus": self.options.gpus_per_run,
                           "max_retries": self.options.max_retries, "retry_exceptions": False}
                refs.append(task.options(**options).remote(spec))
                say(f"{spec.name}: queued on Ray for {spec.run_dir} ({options['num_cpus']} CPU(s), "
                    f"{options['num_gpus']} GPU(s))")
            results = []
            for spec, ref in zip(specs, refs, strict=True):
                try:
                    results.append(ray.get(ref))
                except Exception as exc:  # the task's worker died more often than max_retries allows
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    results.append(UnitResult(name=spec.name, run_dir=str(spec.config.out), status="failed",
                                              error=f"Ray task failed after {self.options.max_retries} "
                                                    f"retries ({type(exc).__name__}: {first})"))
            return results
        finally:
            if started:
                ray.shutdown()


def _check_reachable(address: str) -> None:
    """A host:port (or ray://host:port) address must accept a connection within a few seconds: ray.init
    itself keeps retrying an unreachable address for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: cannot connect to a Ray cluster there "
                          f"({exc.strerror or exc}); start one with `ray start --head`, or leave "
                          "--ray-address out to start a local one") from None


BACKENDS.add("ray", RayBackend)

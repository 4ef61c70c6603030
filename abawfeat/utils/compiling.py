"""``torch.compile`` with an eager fallback that is said once, loudly: one helper for every compiled path.

Extraction compiles the frozen encoder (inductor's freezing, one static shape); stage two compiles a trunk's
forward for training (``train-head --compile``: dynamic shapes, gradients). Both must survive a machine
where compiling fails (no C++ compiler on a cluster node, an unsupported device): the eager function computes
the same thing, so the run goes on eagerly after a warning that names the flag that skips the attempt.

Compiled code is not bit-identical to eager code (inductor fuses elementwise chains and reorders their float
operations), so whether a run compiled is part of its configuration, saved with it. Inductor's on-disk cache
keys its CPU kernels by the thread count among other things, so a cached kernel never changes a run's threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


class CompiledWithFallback:
    """``fn`` compiled on its first call (``torch.compile(fn, mode=, dynamic=)``, inside ``context()`` when
    given); if compiling fails, one loud warning and ``fn`` itself from then on (``failed`` says which ran).

    ``doing`` completes the warning's sentence ("extracting", "training"); ``skip`` is the option that avoids
    the attempt."""

    def __init__(self, fn: Callable[..., Any], *, doing: str, skip: str, mode: str | None = None,
                 dynamic: bool | None = None, context: Callable[[], Any] | None = None) -> None:
        import torch

        self.eager = fn
        self.compiled: Any = torch.compile(fn, dynamic=dynamic, mode=mode)
        self.context = context or contextlib.nullcontext
        self.doing, self.skip = doing, skip
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            with self.context():
                return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            from abawfeat.utils.progress import loud_warning

            self.failed = True
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            loud_warning(f"torch.compile failed ({reason}); {self.doing} eagerly instead (slower, the same "
                         f"computation); {self.skip} skips the attempt.")
            return self.eager(*args, **kwargs)


def compile_training_forward(module: Any) -> CompiledWithFallback:
    """Compile ``module``'s forward for training, in place (its parameters, state-dict keys and checkpoints
    are unchanged): calls with gradients enabled run compiled, calls without (validation, prediction) run
    the eager forward, so that evaluation never waits for a compile of its own shapes. Static shapes: a
    dynamic graph compiled many times slower on CPU, and training sees two batch sizes (the full one and
    the epoch's last) and two mask modes, each compiled once. Returns the compiled wrapper (``failed``)."""
    import torch

    eager = module.forward
    compiled = CompiledWithFallback(eager, doing="training", skip="leaving out --compile", dynamic=False)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)

    module.forward = forward
    return compiled


def inductor_freezing() -> Any:
    """A context in which inductor treats parameters as constants (folded, pre-packed, cast once): for
    inference-only graphs, never for training."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)

"""Regional compilation: ``torch.compile`` on each transformer block (``train.compile``, ``eval.compile``).

Each block's ``forward`` is compiled in place (as torchtitan's ``apply_compile`` compiles each
transformer block): the blocks share one compiled graph, so compile time does not grow with
depth, and no module is wrapped, so state-dict names stay those of the eager model (no
``_orig_mod.``): checkpoints load in an eager run and in timm. Only ``forward`` is compiled, not
the module's ``__call__``: hooks around a block (ZeRO-3's parameter gathering and release)
run eagerly around the compiled region, and activation checkpointing
(``model.grad_checkpointing``) wraps the compiled block, whose recomputation reruns it.

Under ZeRO-3 each block is made a ZeRO-3 leaf module before the engine is built: its
parameters are gathered by one hook on the block, none is registered on the layers inside
it (a hook inside a compiled region is a graph break), and DeepSpeed's memory-efficient
linear, which dynamo cannot trace, is turned off (``zero_optimization.memory_efficient_linear``).

:class:`CompileWatch` makes the cost visible: the seconds spent compiling (the first steps),
the number of recompilations and their reasons, and a warning naming the cause when they
pass ``max_recompiles`` (a storm: e.g. a batch of another shape each time, with
``dynamic=false``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter

import torch

log = logging.getLogger("pipeline.compile")

RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"


def compile_blocks(
    model: torch.nn.Module,
    mode: str = "default",
    backend: str = "inductor",
    dynamic: bool | None = None,
    zero3: bool = False,
) -> int:
    """Compile the ``forward`` of every block of ``model.blocks`` in place; returns how many.

    ``dynamic`` None: torch's automatic dynamic shapes (a second input shape recompiles once
    with that size symbolic); False: every new shape compiles anew; True: symbolic from the
    start. ``zero3``: mark the blocks as ZeRO-3 leaf modules (call before ``deepspeed.initialize``).
    """
    if zero3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(model.blocks[0])])
    options = {"mode": None if mode == "default" else mode, "backend": backend, "dynamic": dynamic}
    for block in model.blocks:
        # An instance attribute: the class, its parameters and their names stay as they are.
        block.forward = torch.compile(block.forward, **options)
    return len(model.blocks)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether :func:`compile_blocks` compiled ``module``'s blocks."""
    blocks = getattr(module, "blocks", None)
    return bool(blocks) and "forward" in vars(blocks[0])


class CompileWatch:
    """Compile seconds, recompilations and their reasons of this process, from dynamo's
    compile callbacks and its ``recompiles`` log; ``max_recompiles`` more than that is a storm
    (the warning names ``key``, the config section that set it)."""

    def __init__(self, max_recompiles: int = 4, quiet: bool = False, key: str = "train.compile"):
        self.max_recompiles, self.quiet, self.key = max_recompiles, quiet, key
        self.seconds = 0.0
        self.compiles = 0
        self.recompiles = 0
        self.reasons: Counter[str] = Counter()
        self.warned = False
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()
        from torch._dynamo.callback import callback_handler

        self._handler = callback_handler
        self._start = callback_handler.register_start_callback(self._on_start)
        self._end = callback_handler.register_end_callback(self._on_end)
        self._reason_log = _ReasonHandler(self)
        _capture_recompile_reasons(self._reason_log)
        self._breaks0 = _graph_breaks()

    def _on_start(self, args) -> None:
        with self._lock:
            self._started[str(args.compile_id)] = time.perf_counter()

    def _on_end(self, args) -> None:
        with self._lock:
            t0 = self._started.pop(str(args.compile_id), None)
            if t0 is not None:
                self.seconds += time.perf_counter() - t0
            self.compiles += 1

    def reason(self, message: str) -> None:
        """One recompilation, as dynamo logs it (the function, then its guard failures)."""
        lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines()[2:]]
        cause = next((ln for ln in lines if ln and not ln.startswith(("User stack", "File "))), message.splitlines()[0])
        with self._lock:
            self.recompiles += 1
            self.reasons[_plain(cause)] += 1
        if self.recompiles > self.max_recompiles and not self.warned:
            self.warned = True
            if not self.quiet:
                log.warning(
                    "recompilation storm: %d recompilations of the compiled blocks (more than "
                    "%s.max_recompiles=%d); causes: %s",
                    self.recompiles,
                    self.key,
                    self.max_recompiles,
                    "; ".join(f"{c} (x{n})" for c, n in self.reasons.most_common(3)),
                )

    def metrics(self) -> dict[str, float]:
        """Seconds compiling, recompilations, and graph breaks (a region compiled in pieces) since the start."""
        return {
            "compile/seconds": self.seconds,
            "compile/recompiles": float(self.recompiles),
            "compile/graph_breaks": float(_graph_breaks() - self._breaks0),
        }

    def report_first_step(self, step: int, seconds: float, mode: str, blocks: int, tracker=None) -> None:
        """The compile cost, once, after this process's first step: a log line, and with rank 0's
        ``tracker`` a metric."""
        log.info(
            "train.compile: %d blocks compiled (mode %s): %.1f s of compiling in step %d, which took %.1f s",
            blocks,
            mode,
            self.seconds,
            step,
            seconds,
        )
        if tracker is not None:
            tracker.log_metrics({"compile/first_step_seconds": seconds, **self.metrics()}, step)

    def summary(self) -> dict:
        """For training's summary: the metrics without their prefix, the causes of recompilation,
        whether there was a storm."""
        return {
            **{k.split("/")[1]: v for k, v in self.metrics().items()},
            "reasons": dict(self.reasons),
            "storm": self.warned,
        }

    def close(self) -> None:
        self._handler.remove_start_callback(self._start)
        self._handler.remove_end_callback(self._end)
        logging.getLogger(RECOMPILES_LOGGER).removeHandler(self._reason_log)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _plain(cause: str) -> str:
    """A guard failure without its compile id and source comment, in words where it is a common one."""
    cause = re.sub(r"^\d+/\d+: ", "", cause).split("  # ")[0].strip()
    if "size mismatch at index 0" in cause:
        return f"a batch of another size ({cause}); with dynamic=false every new batch size compiles anew"
    if "size mismatch" in cause or "stride mismatch" in cause:
        return f"an input of another shape ({cause})"
    if "grad_mode" in cause.lower() or "GradMode" in cause:
        return f"grad mode changed ({cause})"
    return cause


class _ReasonHandler(logging.Handler):
    def __init__(self, watch: CompileWatch):
        super().__init__(logging.DEBUG)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        self.watch.reason(record.getMessage())


def _capture_recompile_reasons(handler: logging.Handler) -> None:
    """Route dynamo's ``recompiles`` log (off by default) to ``handler`` and nowhere else; with
    $TORCH_LOGS set, the user's logging settings stay and the reasons reach both."""
    if not os.environ.get("TORCH_LOGS"):
        torch._logging.set_logs(recompiles=True)
        logging.getLogger(RECOMPILES_LOGGER).propagate = False
    logging.getLogger(RECOMPILES_LOGGER).addHandler(handler)

"""Pipeline runtime: schedules as data, a validator, a simulator and a torch.distributed executor.

* IR (:mod:`.actions`): per rank, an ordered tuple of :class:`Action` ``F``/``B``/``P1``/``P2``
  (plus ``SF``/``RF``/``SB``/``RB`` in the explicit form), text form ``F3.1``, ``P2[0-7].0``.
* :func:`make_schedule`: ``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zb-h1``, ``auto``; with
  ``chunks > 1`` in the looped layout or ZB-V's V (``layout="v"``, :data:`LAYOUTS`).
* :func:`validate`, :func:`simulate`, :class:`Timeline` (Chrome trace + PNG).
* :class:`PipelineExecutor` runs a schedule for real; :func:`spawn` / :func:`init_from_env`
  start the processes; :func:`pipeline_blocks` turns any list of modules (tensor or tuple in,
  tensor or tuple out) into blocks for it (ready splitters for Hugging Face models:
  :mod:`twobp.hf`); :class:`TwoBPPipelineStage` runs twobp stages under torch.distributed.pipelining's
  own schedules (its I step is p1, its W step p2).
* :func:`measure_block_costs` times each block; :func:`balance` cuts stages by those costs.

Executor names are imported lazily so that schedule work does not need torch.distributed.
"""

from .actions import LAYOUTS, Action, B, F, P1, P2, Schedule, parse_action
from .auto import auto_report, auto_schedule, lower_bound
from .costs import UNIT_COSTS, Costs, MemorySizes, as_costs, mean_costs, median_costs, with_fused_backward
from .generators import SCHEDULE_NAMES, make_schedule
from .lowering import fuse_backward, lower_comm, merge_p2
from .simulate import SimResult, simulate
from .timeline import Event, Timeline
from .validate import ScheduleError, validate

_LAZY = {
    "PipelineExecutor": ".executor",
    "StepResult": ".executor",
    "partition_blocks": ".partition",
    "Partition": ".partition",
    "SharedParameterError": ".partition",
    "spawn": ".launch",
    "init_from_env": ".launch",
    "WorkerError": ".launch",
    "simulate_main": ".cli_simulate",
    "init_mesh": ".parallel",
    "pipeline_blocks": ".blocks",
    "TwoBPPipelineStage": ".torch_runtime",
    "pack": ".blocks",
    "unpack": ".blocks",
    "replica_slice": ".parallel",
    "agree_costs": ".parallel",
    "measure_block_costs": ".block_costs",
    "balance": ".partition",
}

__all__ = [
    "Action", "B", "F", "P1", "P2", "Schedule", "parse_action", "LAYOUTS",
    "Costs", "MemorySizes", "UNIT_COSTS", "as_costs", "mean_costs", "median_costs", "with_fused_backward",
    "SCHEDULE_NAMES", "make_schedule", "auto_schedule", "auto_report", "lower_bound",
    "fuse_backward", "lower_comm", "merge_p2",
    "ScheduleError", "validate",
    "SimResult", "simulate",
    "Event", "Timeline",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'twobp.pipeline' has no attribute {name!r}")

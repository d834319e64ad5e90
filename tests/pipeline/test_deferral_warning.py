"""A 2BP schedule on stages where nothing is deferred warns, naming what convert() would swap or
leave and why; converted stages, plain schedules and parameter-free stages stay quiet."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import twobp
from twobp.pipeline import spawn
from twobp.pipeline.deferral import deferred_parameters, warn_if_nothing_deferred

sys.path.insert(0, str(Path(__file__).parent))


class OwnNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


def _warned(stages, splits=True):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said = warn_if_nothing_deferred(stages, schedule_name="1f1b", rank=1, splits=splits)
    return said, " ".join(str(w.message) for w in caught)


def test_unconverted_stage_warns_with_what_convert_would_do():
    said, text = _warned({0: nn.Sequential(nn.Linear(4, 4), OwnNorm())})
    assert said and "nothing is deferred" in text and "rank 1" in text
    assert "Linear -> TwoBPLinear (convert() would swap it)" in text and "twobp.convert(model)" in text
    assert "OwnNorm (no twobp twin" in text


def test_stage_of_classes_without_twins_says_why():
    said, text = _warned({0: nn.Sequential(OwnNorm()), 1: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))})
    assert said and "groups=2" in text and "extra={cls: factory}" in text


def test_quiet_when_something_is_deferred_or_nothing_splits():
    assert not _warned({0: twobp.convert(nn.Sequential(nn.Linear(4, 4), OwnNorm()))})[0]
    assert not _warned({0: nn.Sequential(nn.Linear(4, 4))}, splits=False)[0]
    assert not _warned({0: nn.Sequential(nn.Tanh())})[0], "no trainable parameter: nothing to defer"
    frozen = nn.Linear(4, 4).requires_grad_(False)
    assert deferred_parameters(nn.Sequential(frozen, twobp.TwoBPLinear(4, 2))) == (10, 10)


def _executor_warnings(rank, world, convert):
    from twobp.pipeline import PipelineExecutor, make_schedule

    blocks = [nn.Linear(4, 4), nn.Linear(4, 2)]
    if convert:
        blocks = [twobp.convert(b) for b in blocks]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PipelineExecutor(blocks, nn.functional.mse_loss, schedule=make_schedule("1f1b", stages=1, microbatches=2,
                                                                                twobp=True))
    return [str(w.message) for w in caught if "nothing is deferred" in str(w.message)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_executor_warns_at_construction():
    assert len(spawn(_executor_warnings, world_size=1, args=(False,), timeout=30)[0]) == 1
    assert spawn(_executor_warnings, world_size=1, args=(True,), timeout=30)[0] == []

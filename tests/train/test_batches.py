"""smolbox.train.batches: train.global_batch_size pairs a step, split over the processes into micro-batches and
accumulation, or refused with the process counts that split it."""

import pytest

from smolbox.config import load_config
from smolbox.train import RunError, plan_batches

TINY = load_config("tiny", env={}, dotenv=None).train  # 4 pairs a step, micro-batches of 2


@pytest.mark.parametrize("processes, micro, accumulation", [(1, 2, 2), (2, 2, 1), (4, 1, 1)])
def test_global_batch_is_split_over_processes(processes, micro, accumulation):
    plan = plan_batches(TINY, processes)
    assert (plan.micro_batch, plan.accumulation, plan.pairs_per_step) == (micro, accumulation, 4)


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(RunError, match="cannot be split evenly over 3 processes: use 1, 2, 4 GPUs"):
        plan_batches(TINY, 3)

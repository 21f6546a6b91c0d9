"""smolbox.train.trainer's sampler: every epoch cut to whole optimizer steps, in an order of the seed and epoch."""

import pytest

from smolbox.train.trainer import WholeStepsSampler


def test_whole_steps_sampler_cuts_each_epoch_to_whole_steps():
    sampler = WholeStepsSampler(10, 4, seed=7)
    first = list(sampler)
    assert len(sampler) == len(first) == 8 and len(set(first)) == 8 and set(first) <= set(range(10))
    assert list(WholeStepsSampler(10, 4, seed=7)) == first  # the order depends on seed and epoch only
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        WholeStepsSampler(3, 4, seed=7)

"""Weight versions reported by servers and carried by samples."""

import pytest
import torch

from megatron_pr2.rollout.engine import RolloutError
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.rollout.weight_version import (
    StaleWeightsError,
    batch_version,
    reported_version,
)


def _sample(version):
    return Sample(tokens=torch.tensor([1, 2, 3]), prompt_length=1,
                  metadata={} if version is None else {"weight_version": version})


def test_a_server_reports_its_version_or_the_trainers_is_used():
    assert reported_version("4", 4, "s") == 4
    assert reported_version(4, 4, "s") == 4
    assert reported_version("default", 4, "s") == 4  # never tagged: the last sync's version
    assert reported_version(None, None, "s") is None


def test_a_server_reporting_another_version_missed_a_sync():
    with pytest.raises(StaleWeightsError, match="version 3.*last sync to it was version 4"):
        reported_version("3", 4, "server x")


def test_a_batch_has_one_version():
    assert batch_version([_sample(2), _sample(2)]) == 2
    assert batch_version([_sample(None), _sample(None)]) is None
    with pytest.raises(RolloutError, match="several weight versions"):
        batch_version([_sample(2), _sample(3)])

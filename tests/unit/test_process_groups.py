"""Process groups reach the trainer's parts explicitly: positions and shares are read from the
collection they are given, and only the platform touches Megatron's ``parallel_state`` globals."""

import pathlib
import re
from types import SimpleNamespace

import megatron_pr2


class _Group:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _groups(**ranks):
    """A collection with every group the parts read; ``name=(size, rank)`` overrides (1, 0)."""
    names = ("pp", "tp", "expt_tp", "ep", "dp", "dp_cp", "expt_dp")
    return SimpleNamespace(**{name: _Group(*ranks.get(name, (1, 0))) for name in names})


def test_weight_sync_position_is_read_from_the_given_groups():
    from megatron_pr2.weight_sync.gather import StagePosition

    groups = _groups(pp=(4, 3), tp=(2, 1), expt_tp=(2, 0), ep=(4, 2), dp_cp=(2, 0),
                     expt_dp=(1, 0))
    position = StagePosition.of(groups)
    assert position.stage == 3
    assert (position.sizes.tp, position.sizes.etp, position.sizes.ep) == (2, 2, 4)
    assert (position.tp_rank, position.etp_rank, position.ep_rank) == (1, 0, 2)
    assert position.dense_member and position.expert_member
    assert not position.is_pusher  # TP rank 1, EP rank 2
    pusher = StagePosition.of(_groups(pp=(4, 3), tp=(2, 0), ep=(4, 0), dp_cp=(2, 0)))
    assert pusher.is_pusher
    assert not StagePosition.of(_groups(dp_cp=(2, 1))).dense_member
    assert not StagePosition.of(_groups(expt_dp=(2, 1))).expert_member


def test_rollout_share_is_the_given_data_parallel_group():
    from megatron_pr2.training.rollout_source import data_parallel_coordinates

    assert data_parallel_coordinates(_groups(dp=(4, 3))) == (4, 3)


def test_only_the_platform_reads_megatron_parallel_state():
    """Megatron's own initialisation stays in ``platform/distributed.py`` (and the strict device
    mode lists Megatron's gloo groups there); every other module gets its groups passed in."""
    package = pathlib.Path(megatron_pr2.__file__).parent
    readers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                     if re.search(r"\bparallel_state\b", path.read_text()))
    assert readers == ["platform/distributed.py", "platform/strict_device.py"]

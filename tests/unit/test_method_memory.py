"""The dry run's host weight copies per routing method, against hand-computed byte counts."""

import pytest

from megatron_pr2.preflight.memory import ParamEstimate, weight_copy_bytes
from megatron_pr2.preflight.placement import Placement
from megatron_pr2.routing.methods import ROUTING_METHODS, routing_method

# 16 GPUs: TP 2, PP 2, EP 4 -> dense DP 4, expert DP 2
LAYOUT = Placement(world_size=16, tp=2, pp=2, vpp=1, ep=4, etp=1, cp=1, sequence_parallel=False)
PARAMS = ParamEstimate(total=0, active=0, per_gpu=1000, predictor_per_gpu=0, experts_per_gpu=600)


def _bytes(method, bf16, distributed):
    return sum(weight_copy_bytes(c, PARAMS, LAYOUT, bf16, distributed)
               for c in routing_method(method).weight_copies(bf16))


@pytest.mark.parametrize("bf16, distributed, expected", [
    (False, False, 1000 * 4),  # every weight the GPU holds, fp32
    (False, True, (400 / 4 + 600 / 2) * 4),  # its slice: dense over DP 4, experts over DP 2
    (True, False, 0), (True, True, 0),  # bf16: cast again from the fp32 main weights
])
def test_lookahead_copies_the_weights_each_gpu_updates(bf16, distributed, expected):
    assert _bytes("pr2-lookahead", bf16, distributed) == pytest.approx(expected)


@pytest.mark.parametrize("bf16, distributed", [(False, False), (True, True)])
def test_current_route_keeps_two_whole_copies(bf16, distributed):
    assert _bytes("current-route", bf16, distributed) == 2 * 1000 * (2 if bf16 else 4)


def test_other_methods_keep_no_copies():
    copying = {name for name in ROUTING_METHODS if routing_method(name).weight_copies(False)}
    assert copying == {"pr2-lookahead", "current-route"}

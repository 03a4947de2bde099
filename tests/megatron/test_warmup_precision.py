"""The SFT warm-up under ``--bf16`` (with and without the distributed optimizer).

The warm-up builds its own optimizer over the RL model; it must take the model's precision and
grad-buffer layout (an fp32 optimizer over bf16 weights fails at its first step), and the RL
optimizer built before it must start from the warmed-up weights: with zero gradients, Adam's
step is exactly zero, so the RL optimizer's first step must leave the warmed-up weights as
they are (a stale fp32 main copy would write the pre-warm-up weights back).
"""

import pytest
import torch

from megatron_pr2.models.moe_options import precision_overrides
from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.tasks import DigitTask
from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp
from megatron_pr2.training.warmup import sft_warmup
from tests.megatron.test_router_replay import build


def _weights(model):
    return [p.detach().clone() for chunk in model for p in chunk.parameters()]


@pytest.mark.parametrize("distributed", [False, True])
def test_bf16_warmup_trains_and_the_rl_optimizer_starts_from_its_weights(
        megatron_single_process, distributed):
    config, chunk = build(seed=5, **precision_overrides(True))
    model = wrap_with_ddp([chunk], config, use_distributed_optimizer=distributed)
    rl_optimizer = build_optimizer(model, lr=1e-3, bf16=True,
                                   use_distributed_optimizer=distributed)
    before = _weights(model)
    sft_warmup(model, RoutingController(model), DigitTask(), steps=2, lr=1e-2, batch_size=4,
               micro_batch_size=2, refresh=(rl_optimizer,))
    warmed = _weights(model)
    assert all(w.dtype == torch.bfloat16 for w in warmed)
    assert any(not torch.equal(a, b) for a, b in zip(before, warmed)), "warm-up changed nothing"

    rl_optimizer.zero_grad()
    model[0].zero_grad_buffer()
    for param in model[0].parameters():
        param.main_grad.zero_()
    success, _, _ = rl_optimizer.step()
    assert success
    for after, expected in zip(_weights(model), warmed):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_an_optimizer_that_contradicts_the_model_is_refused(megatron_single_process):
    config, chunk = build(seed=5, **precision_overrides(True))
    model = wrap_with_ddp([chunk], config)
    with pytest.raises(ValueError, match="bf16=False but the model was wrapped with bf16=True"):
        build_optimizer(model, lr=1e-3, bf16=False)

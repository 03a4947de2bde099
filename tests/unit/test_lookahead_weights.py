"""WeightLookahead on plain torch Adam: the shift by hand, the exact restore, and what is copied."""

import pytest
import torch

from megatron_pr2.routing.strategies.lookahead import WeightLookahead

SCALE = 1.5


def _stepped(params):
    adam = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for param in params:
        param.grad = torch.linspace(-1.0, 2.0, param.numel()).view_as(param)
    adam.step()
    return adam


def _mixed_precision(main_params, model_params):
    """What Megatron's Float16OptimizerWithFloat16Params exposes: bf16 weights, fp32 mains."""
    return type("Float16OptimizerWithFloat16Params", (), {
        "optimizer": _stepped(main_params), "float16_groups": [model_params],
        "fp32_from_float16_groups": [main_params]})()


def _by_hand(main, lr=0.1, wd=0.1, eps=1e-8):
    """AdamW's next step after one step with gradient g: m_hat = g, v_hat = g^2."""
    grad = torch.linspace(-1.0, 2.0, main.numel()).view_as(main)
    return main.detach() + SCALE * (-lr * grad / (grad.abs() + eps) - lr * wd * main.detach())


def test_fp32_weights_shift_by_hand_and_come_back_from_a_copy():
    param = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    lookahead = WeightLookahead(_stepped([param]))
    before = param.detach().clone()
    assert lookahead.saved_bytes() == 4 * 4
    for _ in range(2):  # the host copy is made once and reused
        with lookahead.shifted(SCALE):
            torch.testing.assert_close(param.detach(), _by_hand(before), rtol=1e-6, atol=1e-7)
        assert torch.equal(param, before)


def test_bf16_weights_come_back_from_the_fp32_main_copy_without_a_copy():
    main = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    optimizer = _mixed_precision([main], [])
    model = torch.nn.Parameter(main.detach().to(torch.bfloat16))  # as Megatron writes it
    optimizer.float16_groups = [[model]]
    lookahead = WeightLookahead(optimizer)
    assert lookahead.saved_bytes() == 0
    before = model.detach().clone()
    with lookahead.shifted(SCALE):
        assert torch.equal(model, _by_hand(main).to(torch.bfloat16))
        assert not torch.equal(model, before)
    assert torch.equal(model, before) and not lookahead._saved


def test_a_bf16_weight_unlike_its_main_copy_is_copied_and_restored_exactly():
    main = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    model = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.5], dtype=torch.bfloat16))
    lookahead = WeightLookahead(_mixed_precision([main], [model]))
    assert lookahead.saved_bytes() == 4 * 2
    with lookahead.shifted(SCALE):
        assert torch.equal(model, _by_hand(main).to(torch.bfloat16))
    assert torch.equal(model, torch.tensor([0.5, -1.0, 2.0, 0.5], dtype=torch.bfloat16))


def test_zero_scale_leaves_the_weights_alone_and_shifts_do_not_nest():
    param = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    lookahead = WeightLookahead(_stepped([param]))
    before = param.detach().clone()
    with lookahead.shifted(0.0):
        assert torch.equal(param, before)
    with (lookahead.shifted(SCALE), pytest.raises(RuntimeError, match="does not nest"),
          lookahead.shifted(SCALE)):
        pass
    assert torch.equal(param, before)

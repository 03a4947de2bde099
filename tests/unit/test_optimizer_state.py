"""Adam's predicted next step against torch's own AdamW update."""

import pytest
import torch

from megatron_pr2.training.optimizer_state import adam_next_step, adam_param_states


def _stepped_adamw(betas, weight_decay, grads):
    param = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    optimizer = torch.optim.AdamW([param], lr=0.1, betas=betas, eps=1e-8,
                                  weight_decay=weight_decay)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param, optimizer


def test_without_momentum_u_is_the_step_adamw_takes_again_for_the_same_gradient():
    grad = torch.tensor([0.3, -0.02, 1.5, 0.0])
    param, optimizer = _stepped_adamw((0.0, 0.0), 0.1, [grad])
    (state,) = adam_param_states(optimizer)
    u = adam_next_step(state)
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()  # m = g, v = g^2 again: the real next step is the predicted one
    torch.testing.assert_close(u, param.detach() - before, rtol=1e-6, atol=1e-7)


def test_with_momentum_by_hand():
    grads = [torch.tensor([0.3, -0.2, 1.0, 0.1]), torch.tensor([0.1, 0.4, -1.0, 0.1])]
    param, optimizer = _stepped_adamw((0.9, 0.99), 0.0, grads)
    m = 0.1 * (0.9 * grads[0] + grads[1])  # (1-b1)(b1 g1 + g2)
    v = 0.01 * (0.99 * grads[0] ** 2 + grads[1] ** 2)
    expected = -0.1 * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.99 ** 2)).sqrt() + 1e-8)
    (state,) = adam_param_states(optimizer)
    assert state.step == 2 and state.model_param is param
    torch.testing.assert_close(adam_next_step(state), expected, rtol=1e-5, atol=1e-7)


def test_no_state_gives_zero_and_non_adam_is_refused():
    param = torch.nn.Parameter(torch.ones(3))
    (state,) = adam_param_states(torch.optim.AdamW([param], lr=0.1))
    assert state.step == 0 and torch.equal(adam_next_step(state), torch.zeros(3))
    with pytest.raises(ValueError, match="needs Adam"):
        list(adam_param_states(torch.optim.SGD([param], lr=0.1)))


def test_mixed_precision_state_lives_on_the_fp32_master_copy():
    model_param = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    main_param = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([main_param], lr=0.1)
    main_param.grad = torch.tensor([1.0, -1.0, 0.5])
    adam.step()
    # the attributes Megatron's Float16OptimizerWithFloat16Params pairs them with
    wrapper = type("Float16OptimizerWithFloat16Params", (), {
        "optimizer": adam, "float16_groups": [[model_param]],
        "fp32_from_float16_groups": [[main_param]]})()
    (state,) = adam_param_states(wrapper)
    assert state.model_param is model_param and state.main_param is main_param
    assert state.step == 1


def test_distributed_optimizer_is_refused_by_name():
    param = torch.nn.Parameter(torch.ones(3))
    sharded = type("DistributedOptimizer", (), {"optimizer": torch.optim.AdamW([param])})()
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        list(adam_param_states(sharded))

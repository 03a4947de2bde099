"""Adam's predicted next step against torch's own AdamW update."""

import pytest
import torch

from megatron_pr2.routing.strategies.optimizer_state import (
    adam_next_step,
    adam_param_states,
    sharded_model_chunks,
)


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


def _distributed(adam, model_slices, main_shards, **config):
    """An object with the attributes of Megatron's DistributedOptimizer that are read."""
    from types import SimpleNamespace

    return type("DistributedOptimizer", (), {
        "optimizer": adam, "shard_float16_groups": [model_slices],
        "shard_fp32_from_float16_groups": [main_shards], "model_chunks": ["chunk0", "chunk1"],
        "ddp_config": SimpleNamespace(use_megatron_fsdp=config.get("fsdp", False)),
        "config": SimpleNamespace(
            use_precision_aware_optimizer=config.get("precision_aware", False))})()


def test_distributed_optimizer_states_are_this_ranks_slices():
    model_param = torch.nn.Parameter(torch.ones(6, dtype=torch.bfloat16))
    model_slice = model_param.detach().view(-1)[2:5]  # the slice of the buffer this rank owns
    main_shard = torch.nn.Parameter(torch.ones(3))
    fp32_param = torch.nn.Parameter(torch.zeros(4))
    fp32_shard = fp32_param.detach().view(-1)[1:3]  # fp32: the main shard is the model slice
    adam = torch.optim.AdamW([fp32_shard, main_shard], lr=0.1)
    main_shard.grad, fp32_shard.grad = torch.ones(3), torch.ones(2)
    adam.step()
    states = list(adam_param_states(_distributed(adam, [model_slice], [main_shard])))
    assert [s.step for s in states] == [1, 1]
    assert states[0].model_param is fp32_shard and states[0].main_param is fp32_shard
    assert states[1].model_param is model_slice and states[1].main_param is main_shard


def test_sharded_chunks_name_the_distributed_optimizers_model_chunks():
    param = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.AdamW([param])
    sharded = _distributed(torch.optim.AdamW([param]), [], [])
    chained = type("ChainedOptimizer", (), {"chained_optimizers": [plain, sharded, sharded]})()
    assert sharded_model_chunks(plain) == []
    assert sharded_model_chunks(chained) == ["chunk0", "chunk1"]  # once each


def test_a_stub_distributed_optimizer_has_no_states():
    stub = type("DistributedOptimizer", (), {"optimizer": None, "is_stub_optimizer": True})()
    assert list(adam_param_states(stub)) == []


@pytest.mark.parametrize("config, message", [({"fsdp": True}, "Megatron FSDP"),
                                             ({"precision_aware": True}, "precision-aware")])
def test_distributed_optimizer_variants_without_readable_state_are_refused(config, message):
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=message):
        list(adam_param_states(_distributed(torch.optim.AdamW([param]), [], [], **config)))


def test_fp8_parameters_under_the_distributed_optimizer_are_refused():
    main_shard = torch.nn.Parameter(torch.ones(3))
    sharded = _distributed(torch.optim.AdamW([main_shard]), [None], [main_shard])
    with pytest.raises(ValueError, match="FP8"):
        list(adam_param_states(sharded))


def test_the_optimizer_predictor_refuses_the_distributed_optimizer_by_name():
    from megatron_pr2.routing.strategies.optimizer_predictor import (
        router_steps_as_predictors,
    )

    param = torch.nn.Parameter(torch.ones(3))
    sharded = _distributed(torch.optim.AdamW([param]), [], [])
    with (pytest.raises(ValueError, match="--use-distributed-optimizer"),
          router_steps_as_predictors([], sharded, 1.0)):
        pass

"""Strict device mode: host tensors are refused where a GPU would refuse them.

The refused calls below are what the trainer did before its tensors went through
``megatron_pr2.platform.to_device`` (model inputs straight from the host micro-batch layout,
float64 host tensors in data-parallel all-reduces, host advantages in the loss); the CPU
backend alone runs all of them without complaint.
"""

import pytest

from tests.multiproc import run_distributed


def _refused(call) -> str:
    from megatron_pr2.platform import StrictDeviceError

    try:
        call()
    except StrictDeviceError as err:
        return str(err)
    raise AssertionError("strict device mode let a host tensor through")


def _strict_worker(rank):
    import torch
    from megatron.core import parallel_state

    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.models.presets import preset
    from megatron_pr2.platform import (
        ParallelConfig,
        compute_device,
        host_group,
        initialize_model_parallel,
        to_device,
        to_host,
    )
    from megatron_pr2.platform.strict_device import tag_of
    from megatron_pr2.rl.losses import PolicyLossConfig, PolicyLossInputs, policy_loss
    from megatron_pr2.routing.router import ReplayRouter

    initialize_model_parallel(ParallelConfig(), seed=0, device="cpu", strict_device=True)
    out = {"device": str(compute_device())}
    _, _, model = build_model(preset("tiny-qwen3-moe"),
                              options=ModelOptions(router_class=ReplayRouter))
    out["params_on_device"] = all(tag_of(p) == "device" for p in model.parameters())
    tokens = torch.randint(0, 64, (2, 8))  # as the host micro-batch layout holds them
    positions = torch.arange(8).expand(2, -1)
    out["model_input"] = _refused(lambda: model(tokens, positions, None))
    logits = model(to_device(tokens), to_device(positions), None)
    out["logits_on_device"] = tag_of(logits) == "device"

    dp = parallel_state.get_data_parallel_group()
    metrics = torch.tensor([0.5, 1.0], dtype=torch.float64)  # the old _reduce_metrics
    out["collective"] = _refused(lambda: torch.distributed.all_reduce(metrics, group=dp))
    torch.distributed.all_reduce(metrics, group=host_group())  # host values on the host group
    torch.distributed.all_reduce(to_device(metrics), group=dp)
    # pipeline sends go through P2POp: a host activation is refused, a device one accepted
    out["p2p"] = _refused(lambda: torch.distributed.P2POp(torch.distributed.isend, metrics, 0, dp))
    out["p2p_device_op"] = torch.distributed.P2POp(
        torch.distributed.isend, to_device(metrics), 0, dp).op.__module__

    logp = torch.log_softmax(logits.float(), -1)[..., 0]
    host_inputs = PolicyLossInputs(logp=logp, old_logp=logp.detach(),
                                   advantages=torch.ones(2, 8), mask=torch.ones(2, 8).bool())
    out["loss"] = _refused(lambda: policy_loss(host_inputs, PolicyLossConfig()))
    device_inputs = PolicyLossInputs(logp=logp, old_logp=logp.detach(),
                                     advantages=to_device(torch.ones(2, 8)),
                                     mask=to_device(torch.ones(2, 8).bool()))
    loss, _ = policy_loss(device_inputs, PolicyLossConfig())
    out["loss_on_device"] = tag_of(loss) == "device"

    stored = to_host(logits[0, :, :4])  # PR2's h_old/p_old storage
    out["stored_on_host"] = tag_of(stored) == "host"
    out["stored_used"] = _refused(lambda: logits[0, :, :4] - stored)
    out["stored_moved_back"] = tag_of(logits[0, :, :4] - to_device(stored)) == "device"
    return out


@pytest.fixture(scope="module")
def strict_run():
    return run_distributed(_strict_worker, 1)[0]


def test_strict_mode_names_the_compute_device_and_moves_the_model(strict_run):
    assert strict_run["device"] == "cpu:0"
    assert strict_run["params_on_device"]  # norms and the predictor too, not only Megatron's
    assert strict_run["logits_on_device"]


def test_host_tensor_reaching_the_model_is_refused(strict_run):
    assert "GPTModel input 'input_ids' (2, 8) int64 is not on the compute device" \
        in strict_run["model_input"]


def test_host_tensor_in_a_device_collective_is_refused(strict_run):
    assert "torch.distributed.all_reduce got a host tensor (2,) float64" in strict_run["collective"]


def test_host_tensor_in_a_pipeline_send_is_refused(strict_run):
    assert "torch.distributed.isend got a host tensor" in strict_run["p2p"]
    # torch's own isend reaches batch_isend_irecv (its identity check refuses any wrapper)
    assert strict_run["p2p_device_op"] == "torch.distributed.distributed_c10d"


def test_host_tensor_in_the_loss_is_refused(strict_run):
    assert "mixes device tensors with a host tensor (2, 8)" in strict_run["loss"]
    assert strict_run["loss_on_device"]


def test_stored_predictor_inputs_must_be_moved_back(strict_run):
    assert strict_run["stored_on_host"]
    assert "host tensor (8, 4) float32" in strict_run["stored_used"]
    assert strict_run["stored_moved_back"]


def test_strict_mode_is_refused_with_cuda():
    from megatron_pr2.platform import StrictDeviceError, init_process_group

    with pytest.raises(StrictDeviceError, match="cannot be used with --device cuda"):
        init_process_group("cuda", strict_device=True)

"""UpdateDirectionProbe: the real mini-step updates against Adam's predicted next step."""

import math

import pytest
import torch

from megatron_pr2.training.update_direction import UpdateDirectionProbe


def _adam(grads_per_step, lr=0.1):
    """A parameter with one Adam step taken (so Adam has state), the probe, and a stepper."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = torch.optim.Adam([param], lr=lr)

    def step(grad):
        param.grad = torch.tensor(grad)
        optimizer.step()

    step(grads_per_step[0])
    return param, UpdateDirectionProbe(optimizer), step


def test_a_constant_gradient_moves_exactly_along_adams_predicted_step():
    grad = [0.3, -1.0, 2.0]
    param, probe, step = _adam([grad])
    probe.begin()
    for _ in range(3):
        step(grad)
        probe.after_ministep()
    metrics = probe.metrics()
    # with a constant gradient m_hat = g and v_hat = g^2 at every step: each step is -lr g/|g|
    assert metrics["update/cos_displacement_vs_adam_step"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["update/displacement_norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert metrics["update/cos_consecutive_steps"] == pytest.approx(1.0, abs=1e-6)


def test_a_reversed_gradient_is_measured_by_hand():
    grad = [1.0, 1.0, 1.0]
    lr, beta1, beta2, eps = 0.1, 0.9, 0.999, 1e-8
    param, probe, step = _adam([grad], lr=lr)
    # Adam's state after step 1 (t = 1): m = 0.1 g, v = 0.001 g^2
    m, v = (1 - beta1) * 1.0, (1 - beta2) * 1.0
    u = -lr * (m / (1 - beta1)) / (math.sqrt(v / (1 - beta2)) + eps)  # predicted next step
    probe.begin()
    step([-1.0, -1.0, -1.0])  # the real gradient turns round
    probe.after_ministep()
    m, v = beta1 * m - (1 - beta1), beta2 * v + (1 - beta2)
    real = -lr * (m / (1 - beta1 ** 2)) / (math.sqrt(v / (1 - beta2 ** 2)) + eps)
    metrics = probe.metrics()
    assert metrics["update/cos_displacement_vs_adam_step"] == pytest.approx(
        math.copysign(1.0, real * u), abs=1e-6)
    assert metrics["update/displacement_norm_ratio"] == pytest.approx(abs(real / u), rel=1e-4)
    assert "update/cos_consecutive_steps" not in metrics  # one step: nothing to compare yet

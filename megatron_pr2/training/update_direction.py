"""How well Adam's predicted next step anticipates the real mini-step updates (a diagnostic).

Lookahead routing assumes the weights after ``k`` mini-steps sit near ``theta_0 + k u``, ``u``
Adam's next step read before the first mini-step
(:mod:`megatron_pr2.routing.strategies.optimizer_state`).
This probe measures that assumption while gradients are live:

- ``update/cos_displacement_vs_adam_step``: mean over mini-steps ``k = 1 .. N`` of
  ``cos(theta_k - theta_0, u)`` (1: the weights moved exactly along ``u``);
- ``update/displacement_norm_ratio``: mean of ``|theta_k - theta_0| / (k |u|)``;
- ``update/cos_consecutive_steps``: mean over ``k = 2 .. N`` of ``cos(step_k, step_{k-1})``.

Dot products run over the main parameters each rank updates, summed over all ranks (replicated
parameters count once per replica: a diagnostic, not an exact global cosine). It keeps three fp32
copies of those parameters, so it is off unless ``--log-update-direction`` is given.
"""

from __future__ import annotations

import torch

from megatron_pr2.routing.strategies.optimizer_state import (
    adam_next_step,
    adam_param_states,
)


def _flat_main(optimizer) -> torch.Tensor:
    return torch.cat([s.main_param.detach().float().reshape(-1)
                      for s in adam_param_states(optimizer)])


def _global_dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(a.b, a.a, b.b)`` summed over every rank."""
    sums = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).double()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return tuple(float(v) for v in sums)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    ab, aa, bb = _global_dots(a, b)
    return ab / (aa * bb) ** 0.5 if aa > 0 and bb > 0 else None


class UpdateDirectionProbe:
    """Call :meth:`begin` before a rollout batch's mini-steps, :meth:`after_ministep` after each
    (collective), and :meth:`metrics` at the end."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def begin(self) -> None:
        self.theta0 = _flat_main(self.optimizer)
        self.u = torch.cat([adam_next_step(s).reshape(-1)
                            for s in adam_param_states(self.optimizer)])
        self.previous, self.previous_step, self.steps_done = self.theta0, None, 0
        self.cos_displacement, self.norm_ratio, self.cos_consecutive = [], [], []

    def after_ministep(self) -> None:
        current = _flat_main(self.optimizer)
        step = current - self.previous
        self.steps_done += 1
        if self.previous_step is not None:
            cos = _cosine(step, self.previous_step)
            if cos is not None:
                self.cos_consecutive.append(cos)
        ab, aa, bb = _global_dots(current - self.theta0, self.u)
        if aa > 0 and bb > 0:  # the lookahead's guess: theta_k ~ theta_0 + k u
            self.cos_displacement.append(ab / (aa * bb) ** 0.5)
            self.norm_ratio.append((aa / bb) ** 0.5 / self.steps_done)
        self.previous, self.previous_step = current, step

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, values in (("cos_displacement_vs_adam_step", self.cos_displacement),
                             ("displacement_norm_ratio", self.norm_ratio),
                             ("cos_consecutive_steps", self.cos_consecutive)):
            if values:
                out[f"update/{name}"] = sum(values) / len(values)
        return out

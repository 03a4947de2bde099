"""Lookahead routing (``pr2-lookahead``): route mini-batch ``m`` at ``theta_0 + c (m-1) u``.

``u`` is Adam's predicted next step of every trainable parameter
(:mod:`megatron_pr2.routing.strategies.optimizer_state`), read before the old-log-prob pass.
Mini-batch ``m`` is trained at ``theta_{m-1}`` ~ ``theta_0 + (m-1) u``; a no-grad forward in
record mode at ``theta_0 + c (m-1) u`` predicts the route the router will take then. The old
log-probs are computed at ``theta_0`` replaying those routes, so the importance ratio uses one
route for both policies. Mini-batch 1 is recorded live at ``theta_0``: exactly R2.

Cost: one no-grad forward over ``(N-1)/N`` of the rollout batch. The weights are restored bit for
bit after each shifted forward: in bf16 training cast again from the optimizer's fp32 main copy
(no copy kept), in fp32 training from a host copy of the weights this rank updates. Under the
distributed optimizer a rank updates only its slice of DDP's parameter buffer (1/DP of the
weights), so it shifts (and copies) only that slice; two all-gathers of the parameter buffer per
shifted forward (after the shift, after the restore) complete the weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from megatron_pr2.platform.distributed import any_rank
from megatron_pr2.rl.batch_plan import split_ministeps
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.routing.strategies.optimizer_state import (
    adam_next_step,
    adam_param_states,
    sharded_model_chunks,
)

logger = logging.getLogger(__name__)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy off the accelerator (pinned host memory on GPU)."""
    if tensor.is_cuda:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return out.copy_(tensor.detach(), non_blocking=True)
    return tensor.detach().clone()


def all_gather_params(chunks) -> None:
    """All-gather each DDP chunk's parameter buffer over its (expert) data-parallel group, as
    Megatron's distributed optimizer does after a step: every rank's slice to every rank."""
    for chunk in chunks:
        chunk.start_param_sync(force_sync=True)


def _main_cast(state) -> torch.Tensor:
    return state.main_param.detach().to(state.model_param.dtype)


def rebuilt_from_main(state) -> bool:
    """The weight equals its fp32 main copy cast to the weight's dtype (bf16 training: Megatron
    writes it so after every step), so it can be restored from there bit for bit, with no copy.
    Never in fp32 training, where the main copy is the weight itself."""
    if state.main_param is state.model_param:
        return False
    return torch.equal(state.model_param, _main_cast(state))


class WeightLookahead:
    """Shift this rank's parameters along Adam's next step and restore them exactly.

    Each rank shifts the parameters (shards) it updates, with the optimizer state that lives with
    them, so every TP/EP/PP/VPP/DP layout works unchanged: replicated parameters have replicated
    state. Under Megatron's distributed optimizer a rank writes only its slice of the parameter
    buffer, and the buffer is all-gathered over the data-parallel group after the shift and after
    the restore. ``u`` is recomputed per parameter when shifting (no second full-size buffer on
    the device). Restoring: bf16 weights are cast again from the optimizer's fp32 main copy
    (checked bit-equal first: no copy); other weights (fp32 training) from a host copy of what
    this rank updates, allocated once per instance.

    Args:
        optimizer: the Megatron (or torch) Adam optimizer of the model.
    """

    def __init__(self, optimizer):
        self.states = [s for s in adam_param_states(optimizer) if s.step > 0]
        self._gathered = sharded_model_chunks(optimizer)
        if any(chunk.ddp_config.overlap_param_gather for chunk in self._gathered):
            raise ValueError("pr2-lookahead all-gathers the shifted parameters synchronously; "
                             "Megatron's overlap_param_gather is not supported with it")
        self._saved: dict[int, torch.Tensor] = {}  # state index -> host copy
        self._active = False
        self._has_state = any_rank(bool(self.states)) if self._gathered else bool(self.states)

    @property
    def has_state(self) -> bool:
        """The optimizer has taken a step (else ``u = 0`` and lookahead is R2). Agreed over all
        ranks under the distributed optimizer, so a rank that owns no slice still joins the
        all-gathers of :meth:`shifted`."""
        return self._has_state

    def saved_bytes(self) -> int:
        """Bytes of the host copy a shift takes now (weights not rebuilt from their main copy)."""
        return sum(s.model_param.numel() * s.model_param.element_size() for s in self.states
                   if not rebuilt_from_main(s))

    @contextlib.contextmanager
    def shifted(self, scale: float):
        """Within the block the model runs at ``theta_0 + scale * u``; restored bit for bit.

        Collective under the distributed optimizer: every data-parallel rank enters it with the
        same ``scale``.
        """
        if self._active:
            raise RuntimeError("WeightLookahead.shifted does not nest")
        if not scale:
            yield self
            return
        self._active = True
        rebuilt = self._save()
        try:
            with torch.no_grad():
                for state in self.states:
                    shifted = state.main_param.detach().float() + scale * adam_next_step(state)
                    state.model_param.copy_(shifted.to(state.model_param.dtype))
            all_gather_params(self._gathered)
            yield self
        finally:
            self._restore(rebuilt)
            all_gather_params(self._gathered)
            self._active = False

    def _save(self) -> list[bool]:
        """Host copies of the weights that cannot be rebuilt from their main copy; returns
        which are rebuilt."""
        rebuilt = [rebuilt_from_main(s) for s in self.states]
        for index, (state, from_main) in enumerate(zip(self.states, rebuilt)):
            if from_main:
                continue
            saved = self._saved.get(index)
            if saved is None:
                self._saved[index] = host_copy(state.model_param)
            else:
                saved.copy_(state.model_param.detach(), non_blocking=saved.is_pinned())
        return rebuilt

    def _restore(self, rebuilt: list[bool]) -> None:
        with torch.no_grad():
            for index, (state, from_main) in enumerate(zip(self.states, rebuilt)):
                source = _main_cast(state) if from_main else self._saved[index]
                state.model_param.copy_(source, non_blocking=False)


def lookahead_routes(actor, minibatches: Sequence[Sequence], scale: float) -> RoutePlan:
    """Routes of mini-batches ``2..N``: mini-batch ``m`` recorded live at ``theta_0 + c(m-1)u``.

    ``minibatches[m-1]`` lists mini-batch ``m``'s micro-batches (their ``old_logp`` are
    overwritten by the shifted forward; the old-log-prob pass recomputes them at ``theta_0``).
    """
    lookahead = WeightLookahead(actor.optimizer)
    plan = RoutePlan()
    for m, chunk in enumerate(minibatches[1:], start=2):
        with lookahead.shifted(scale * (m - 1) if lookahead.has_state else 0.0):
            result = actor.logprob_pass(chunk, "record", record_predictor_inputs=False)
        plan.routes.update(result.routing.routes.routes)
    return plan


def lookahead_old_pass(actor, microbatches: Sequence, window: int, scale: float):
    """The old-log-prob pass of ``pr2-lookahead`` at ``theta_0``; returns a ``PassResult``.

    Mini-batch 1 is recorded live (R2); mini-batches ``2..N`` replay their lookahead routes.
    The result's routes cover every micro-batch (what the mini-steps replay); its metrics are
    the micro-batch-weighted means of the two passes.
    """
    minibatches = split_ministeps(microbatches, window)
    first = actor.logprob_pass(minibatches[0], "record")
    if window == 1:
        return first
    plan = lookahead_routes(actor, minibatches, scale)
    rest = actor.logprob_pass(microbatches[len(minibatches[0]):], "replay", plan)
    return merge_passes([first, rest], [1, window - 1])


def merge_passes(results: Sequence, weights: Sequence[float]):
    """One ``PassResult`` of passes over disjoint micro-batches: all routes, the last pass's
    routing metrics, metrics averaged with ``weights`` (the mini-batches each pass covered)."""
    routes = RoutePlan()
    for result in results:
        routes.routes.update(result.routing.routes.routes)
    routing = results[-1].routing
    routing.routes = routes
    total = sum(weights)
    metrics = {key: sum(w * r.metrics[key] for r, w in zip(results, weights)) / total
               for key in results[0].metrics}
    return type(results[0])(routing, metrics)  # the actor's PassResult

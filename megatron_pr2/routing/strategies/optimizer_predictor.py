"""The optimizer predictor (``--predictor optimizer`` with ``pr2``): no learning, the router
weight's own Adam step as the evolution predictor.

Mini-batch ``m`` is routed in the old-log-prob pass (predict mode, at ``theta_0``) with
``TopK(p_old + h_old (c (m-1) u_r)^T)``, where ``u_r`` is Adam's predicted next step of the
router weight ``W_r`` (:mod:`megatron_pr2.routing.strategies.optimizer_state`) and ``c`` is
``--lookahead-scale``: ``W_p`` is set to ``c (m-1) u_r`` for that mini-batch's pass and restored
after. Mini-batch 1 is recorded live (R2). No extra forward: each mini-batch is predicted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_pr2.rl.batch_plan import split_ministeps
from megatron_pr2.routing.strategies.lookahead import merge_passes
from megatron_pr2.routing.strategies.optimizer_state import (
    adam_next_step,
    adam_param_states,
    sharded_model_chunks,
)

OPTIMIZER_PREDICTOR_SHARDED = (
    "--predictor optimizer needs each router weight's whole Adam step on every rank, but "
    "--use-distributed-optimizer shards Adam's state over data-parallel ranks: use --predictor "
    "learned or train without --use-distributed-optimizer")


@contextlib.contextmanager
def router_steps_as_predictors(routers, optimizer, scale: float):
    """Within the block each router's ``W_p`` is ``scale * u_r``; restored bit for bit after."""
    if sharded_model_chunks(optimizer):
        raise ValueError(OPTIMIZER_PREDICTOR_SHARDED)
    states = {id(s.model_param): s for s in adam_param_states(optimizer)}
    saved = [router.predictor.weight.detach().clone() for router in routers]
    try:
        with torch.no_grad():
            for router in routers:
                state = states.get(id(router.weight))
                step = (adam_next_step(state) if state is not None
                        else torch.zeros_like(router.weight, dtype=torch.float32))
                router.predictor.weight.copy_((scale * step).to(router.predictor.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for router, weight in zip(routers, saved):
                router.predictor.weight.copy_(weight)


def optimizer_predictor_old_pass(actor, microbatches: Sequence, window: int, scale: float):
    """The old-log-prob pass of PR2 with the optimizer predictor; returns a ``PassResult``."""
    minibatches = split_ministeps(microbatches, window)
    results = [actor.logprob_pass(minibatches[0], "record")]
    routers = actor.controller.routers
    for m, chunk in enumerate(minibatches[1:], start=2):
        with router_steps_as_predictors(routers, actor.optimizer, scale * (m - 1)):
            results.append(actor.logprob_pass(chunk, "predict", record_predictor_inputs=False))
    return merge_passes(results, [1] * window)

"""The policy actor: log-prob passes and optimizer mini-steps of a Megatron model with PR2 routers."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from megatron_pr2.platform.device import compute_device
from megatron_pr2.platform.distributed import process_groups
from megatron_pr2.rl.losses import PolicyLossConfig, PolicyLossInputs, policy_loss
from megatron_pr2.routing.controller import RoutingController, StepRouting
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.training.logprobs import token_entropy, token_logprobs
from megatron_pr2.training.nonfinite import NonFiniteGuard
from megatron_pr2.training.padding_mask import stage_padding_mask
from megatron_pr2.training.pipeline_schedule import (
    broadcast_from_last_stage,
    run_schedule,
)
from megatron_pr2.training.policy_grad_norm import PolicyGradNorm
from megatron_pr2.training.rollout_batch import TrainMicroBatch


@dataclasses.dataclass
class PassResult:
    """What one pass over micro-batches produced: routing record and scalar metrics."""

    routing: StepRouting
    metrics: dict[str, float]


def _shape(microbatches: Sequence[TrainMicroBatch], pipeline_size: int) -> tuple[int, int]:
    shapes = {tuple(mb.grid.tokens.shape) for mb in microbatches}
    if pipeline_size == 1:
        return max(shapes)  # no stage-to-stage tensors: each micro-batch keeps its own width
    if len(shapes) != 1:
        raise ValueError(f"micro-batches must share one shape for the schedule, got {shapes}")
    return shapes.pop()


def _mean_metrics(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key mean over micro-batches of scalar device tensors (no host sync)."""
    keys = sorted({k for item in items for k in item})
    return {key: torch.stack([item[key].float() for item in items if key in item]).mean()
            for key in keys}


def _reduce_metrics(metrics: dict[str, torch.Tensor], keys: Sequence[str],
                    groups) -> dict[str, float]:
    """Last-stage metrics made identical on every rank (mean over data-parallel ranks)."""
    values = torch.zeros(len(keys), dtype=torch.float64, device=compute_device())
    for index, key in enumerate(keys):
        if key in metrics:
            values[index] = metrics[key]
    values = broadcast_from_last_stage(values, groups.pp)
    torch.distributed.all_reduce(values, group=groups.dp)
    values /= groups.dp.size()
    return dict(zip(keys, values.tolist()))


class PolicyActor:
    """Runs Megatron's schedule for the RL passes and owns the routing controller.

    Args:
        model: DDP-wrapped model chunks.
        optimizer: the Megatron optimizer over them.
        loss_config: the policy loss and its options.
        controller: the routing controller of the chunks.
        nonfinite: skips steps with a non-finite loss or gradient (default: 8 in a row stop).
        groups: the run's ``ProcessGroupCollection`` (default: Megatron's initialised groups).
    """

    def __init__(self, model, optimizer, loss_config: PolicyLossConfig,
                 controller: RoutingController, nonfinite: NonFiniteGuard | None = None,
                 groups=None):
        self.groups = process_groups(groups)
        self.model = model
        self.optimizer = optimizer
        self.loss_config = loss_config
        self.controller = controller
        self.nonfinite = nonfinite or NonFiniteGuard()
        self._policy_grad_norm = None  # built at the first predictor-training step

    # ----------------------------------------------------------------------------- passes
    def logprob_pass(self, microbatches: Sequence[TrainMicroBatch], mode: str,
                     plan: RoutePlan | None = None,
                     record_predictor_inputs: bool | None = None) -> PassResult:
        """Forward only: fill each micro-batch's ``old_logp``; route with ``mode``.

        ``record_predictor_inputs`` keeps ``h_old, p_old`` for the predictor loss (default: in
        predict mode; PR2-in-engine sets it on a replay pass).
        """
        for chunk in self.model:
            chunk.eval()
        self.controller.begin_step(mode, plan=plan,
                                   record_predictor_inputs=record_predictor_inputs,
                                   capture_router_logprobs=self.loss_config.rspo)
        try:
            with torch.no_grad():
                outputs = self._run(microbatches, self._logprob_step, forward_only=True)
        except BaseException:
            self.controller.abort_step()
            raise
        routing = self.controller.end_step()
        _store_old_logprobs(microbatches, outputs)
        local = _mean_metrics([out["metrics"] for out in outputs])
        return PassResult(routing, _reduce_metrics(local, ["entropy"], self.groups))

    def train_ministep(self, microbatches: Sequence[TrainMicroBatch], plan: RoutePlan | None,
                       mode: str, train_predictor: bool) -> PassResult:
        """One optimizer step on ``microbatches`` (a mini-batch of the rollout batch)."""
        for chunk in self.model:
            chunk.train()
        self.optimizer.zero_grad()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        policy_step = functools.partial(self._policy_step,
                                        normalizer=self._loss_normalizer(microbatches))
        self.controller.begin_step(mode, plan=plan, train_predictor=train_predictor,
                                   capture_router_logprobs=self.loss_config.rspo)
        try:
            outputs = self._run(microbatches, policy_step, forward_only=False)
        except BaseException:
            self.controller.abort_step()
            raise
        routing = self.controller.end_step()
        step = self.nonfinite.step(self.optimizer, self.model,
                                   [o["policy_loss"] for o in outputs if "policy_loss" in o],
                                   label="a mini-step")
        local = _mean_metrics(outputs)
        keys = sorted(local) if local else []
        keys = self._agree_on_keys(keys)
        metrics = _reduce_metrics(local, keys, self.groups)
        metrics["grad_norm"] = step.grad_norm
        metrics["policy_grad_norm"] = self._policy_norm(step, train_predictor)
        metrics["update_skipped"] = float(not step.success)
        return PassResult(routing, metrics)

    def _policy_norm(self, step, train_predictor: bool) -> float:
        """The gradient norm without the predictor's weights (collective when it differs from
        Megatron's: the predictor loss ran in this step)."""
        if not (train_predictor and step.success):
            return step.grad_norm
        if self._policy_grad_norm is None:
            self._policy_grad_norm = PolicyGradNorm(self.optimizer)
        return self._policy_grad_norm.after_step(step.grad_norm)

    # ----------------------------------------------------------------------------- internals
    def _run(self, microbatches, step, forward_only: bool) -> list[dict]:
        batch, seq = _shape(microbatches, self.groups.pp.size())
        return run_schedule(self.model, [mb.model_inputs() for mb in microbatches], step,
                            seq_length=seq, micro_batch_size=batch, forward_only=forward_only,
                            groups=self.groups)

    def _agree_on_keys(self, keys: list[str]) -> list[str]:
        """Metric names known only on the last stage, shared with every stage."""
        holder = [keys]
        group = self.groups.pp
        if group.size() > 1:
            last = torch.distributed.get_global_rank(group, group.size() - 1)
            torch.distributed.broadcast_object_list(holder, src=last, group=group)
        return holder[0]

    def _loss_normalizer(self, microbatches: Sequence[TrainMicroBatch]) -> float:
        """Per-micro-batch divisor that makes the summed loss a global mean (see module doc)."""
        count = torch.zeros((), dtype=torch.float64, device=compute_device())
        for mb in microbatches:
            count += (len(mb.grid.sample_indices) if self.loss_config.aggregation == "seq_mean"
                      else mb.loss_mask.sum())
        group = self.groups.dp
        torch.distributed.all_reduce(count, group=group)
        return max(float(count), 1.0) / (len(microbatches) * group.size())

    def _forward(self, inputs: dict, model):
        self.controller.set_microbatch(inputs["microbatch_id"])
        padding_mask = stage_padding_mask(inputs["padding_mask"], model)
        return model(inputs["tokens"], inputs["positions"], None, padding_mask=padding_mask)

    def _router_logp_grid(self, mb: TrainMicroBatch) -> torch.Tensor:
        """``[B, S, L, K]`` router log-probs of a micro-batch from the routers' ``[S*B]`` rows.

        Position ``s`` holds the routing of the token at ``s``, the one that predicts label
        ``s``; RSPO needs every MoE layer and token here (no pipeline or sequence split).
        """
        batch, seq = mb.grid.tokens.shape
        rows = self.controller.router_logprobs(mb.microbatch_id)
        return rows.reshape(seq, batch, *rows.shape[1:]).transpose(0, 1)

    def _logprob_step(self, inputs: dict, model):
        logits = self._forward(inputs, model)
        mb: TrainMicroBatch = inputs["batch"]

        def collect(logits_BSV):
            mask = mb.loss_mask
            entropy = token_entropy(logits_BSV, self.groups.tp)[mask]
            out = {"microbatch_id": mb.microbatch_id,
                   "old_logp": token_logprobs(logits_BSV, mb.labels).detach(),
                   "metrics": {"entropy": entropy.mean() if entropy.numel()
                               else logits_BSV.new_zeros(())}}
            if self.loss_config.rspo:
                out["router_logp_old"] = self._router_logp_grid(mb)
            return logits_BSV.new_zeros(()), out

        return logits, collect

    def _policy_step(self, inputs: dict, model, normalizer: float):
        logits = self._forward(inputs, model)
        mb: TrainMicroBatch = inputs["batch"]
        rspo = self.loss_config.rspo

        def loss_func(logits_BSV):  # last pipeline stage only
            if mb.old_logp is None:
                raise RuntimeError(f"micro-batch {mb.microbatch_id} has no old log-probs; run "
                                   "the old-log-prob pass first")
            if rspo and mb.router_logp_old is None:
                raise RuntimeError(f"micro-batch {mb.microbatch_id} has no old router log-probs "
                                   "(RSPO); the old-log-prob pass must run with RSPO on")
            loss_inputs = PolicyLossInputs(
                logp=token_logprobs(logits_BSV, mb.labels),
                old_logp=mb.old_logp,
                advantages=mb.advantages,
                mask=mb.loss_mask,
                rollout_logp=mb.rollout_logp if (self.loss_config.tis
                                                 or self.loss_config.icepop) else None,
                router_logp_cur=self._router_logp_grid(mb) if rspo else None,
                router_logp_old=mb.router_logp_old if rspo else None,
            )
            loss, metrics = policy_loss(loss_inputs, self.loss_config, normalizer)
            return loss, {k: v.detach() for k, v in metrics.items()}

        return logits, loss_func


def _store_old_logprobs(microbatches: Sequence[TrainMicroBatch], outputs: list[dict]) -> None:
    """Give each micro-batch the old log-probs (and RSPO router log-probs) the pass computed
    for it; only the last pipeline stage has outputs."""
    by_id = {mb.microbatch_id: mb for mb in microbatches}
    for out in outputs:
        mb = by_id[out["microbatch_id"]]
        mb.old_logp = out["old_logp"]
        mb.router_logp_old = out.get("router_logp_old")

"""The RL loop: rollout -> reward -> advantages -> old-log-prob pass -> mini-steps -> weight sync.

What each routing method does in each phase is read from :mod:`megatron_pr2.routing.methods`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time

import torch
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from megatron_pr2.platform.device import compute_device
from megatron_pr2.rl.advantages import grpo_advantages, zero_advantage_group_fraction
from megatron_pr2.rl.batch_plan import plan_batch, split_ministeps
from megatron_pr2.rl.mismatch import mismatch_metrics
from megatron_pr2.rollout.alignment import (
    build_route_plan,
    model_layer_numbers,
    shard_for_dp,
    stage_route_shape,
)
from megatron_pr2.rollout.engine import RolloutError
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.routing.methods import routing_method
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.training.checkpoint import checkpointing
from megatron_pr2.training.components import Components
from megatron_pr2.training.drift_probe import DriftProbe, drift_metrics
from megatron_pr2.training.engine_weight_sync import EngineWeightSync
from megatron_pr2.training.metrics_log import MetricsLogger
from megatron_pr2.training.nonfinite import nonfinite_context, nonfinite_summary
from megatron_pr2.training.rollout_batch import build_train_microbatches
from megatron_pr2.training.rollout_schedule import RolloutSchedule
from megatron_pr2.training.rollout_source import RolloutSource, grid_layout_of
from megatron_pr2.training.update_direction import UpdateDirectionProbe
from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _layer_mean(step_routing, metric: str) -> float | None:
    values = [m.summary()[metric] for m in step_routing.metrics.values() if metric in m.summary()]
    return sum(values) / len(values) if values else None


def _allreduce_mean(value: float | None) -> float | None:
    """Mean over the ranks that measured ``value`` (None where no rank did)."""
    pair = torch.tensor([value or 0.0, 1.0 if value is not None else 0.0], dtype=torch.float64,
                        device=compute_device())
    torch.distributed.all_reduce(pair)
    return float(pair[0] / pair[1]) if pair[1] > 0 else None


def _routing_metrics(prefix: str, step_routing) -> dict[str, float]:
    out = {}
    for name in ("zero_deviation_ratio", "topk_overlap", "predictor_topk_acc",
                 "zero_predictor_topk_acc", "predictor_delta_ratio", "predictor_loss"):
        value = _allreduce_mean(_layer_mean(step_routing, name))
        if value is not None:
            out[f"{prefix}/{name}"] = value
    return out


def _per_layer_metrics(step_routing) -> dict[str, float]:
    """Per-layer routing metrics of this rank (the layers its pipeline stage holds)."""
    return {f"routing_layer/{k}": v for k, v in step_routing.metric_summary().items()}


def _degenerate_ministeps(sums: dict[str, list[float]]) -> dict[str, float]:
    """How many of an iteration's mini-steps skipped their update (non-finite) or had an
    exactly zero policy gradient (every advantage 0: no learning signal)."""
    skipped = sums.get("update_skipped", [])
    norms = sums.get("policy_grad_norm", [])
    return {"train/skipped_ministeps": float(sum(1 for s in skipped if s)),
            "train/zero_grad_ministeps": float(sum(
                1 for s, n in zip(skipped, norms) if not s and n == 0.0)),
            "train/ministeps": float(len(norms))}


class RLLoop:
    """One training run. ``run()`` executes the iterations; each phase is a short method."""

    def __init__(self, parts: Components, source: RolloutSource):
        self.parts = parts
        self.cfg = parts.cfg
        self.source = source
        self.rollouts = RolloutSchedule(source, asynchronous=self.cfg.rollout.async_rollout,
                                        staleness=self.cfg.rollout.max_weight_staleness,
                                        last_iteration=self.cfg.train.train_iters)
        self.method = routing_method(self.cfg.algo.routing_method, self.cfg.predictor.predictor)
        self.start_iteration = 0
        # this stage's MoE layers: the samples it receives carry routes for those only
        self.route_shape = stage_route_shape(RouteShape.from_hf_config(parts.spec),
                                             model_layer_numbers(parts.model))
        self.weight_sync = EngineWeightSync(self._build_weight_syncer, source.engine,
                                            server_pool=self.cfg.rollout.rollout_engine == "sglang")
        tokens = self.cfg.algo.drift_attribution_tokens
        self.drift_probe = (DriftProbe(parts.actor.controller.routers, parts.spec.num_layers,
                                       tokens) if tokens and self.method.replays else None)
        self.update_probe = (UpdateDirectionProbe(parts.optimizer)
                             if self.cfg.algo.log_update_direction else None)

    # ----------------------------------------------------------------------------- run
    def run(self) -> None:
        self._maybe_resume()
        metrics_log = MetricsLogger(self.cfg.train.tensorboard_dir, self.cfg.train.log_jsonl,
                                    enabled=_is_rank0(),
                                    resume_step=self.start_iteration if self.start_iteration else None)
        self._sync_weights(self.start_iteration)
        if self.cfg.train.eval_before_train and self.start_iteration == 0:
            metrics_log.log(0, self.source.evaluate(self.cfg.train.eval_prompts))
        try:
            for iteration in range(self.start_iteration + 1, self.cfg.train.train_iters + 1):
                started = time.perf_counter()
                with nonfinite_context(iteration):
                    metrics = self.iteration(iteration)
                if self._due(self.cfg.train.eval_interval, iteration):
                    metrics.update(self.source.evaluate(self.cfg.train.eval_prompts))
                metrics["time/iteration_s"] = time.perf_counter() - started
                metrics_log.log(iteration, metrics)
                self._progress(iteration, metrics)
                if self._due(self.cfg.train.save_interval, iteration):
                    self._save(iteration)
            self.weight_sync.close()  # only after a clean run: a hung server would delay exit
        finally:
            self.rollouts.close()
            metrics_log.close()
            if self.drift_probe is not None:
                self.drift_probe.close()

    def iteration(self, iteration: int) -> dict[str, float]:
        """One rollout batch: generate (or take the one generated ahead), score, old-log-prob
        pass, mini-steps, weight sync."""
        samples, rollout_metrics = self.rollouts.take(iteration)
        rollout_metrics.update(self._version_lag(iteration, rollout_metrics))
        train_start = self.rollouts.now()
        rewards = torch.tensor([s.reward for s in samples])
        group_size = self.cfg.rollout.n_samples_per_prompt
        advantages = grpo_advantages(rewards, group_size,
                                     normalize_std=self.cfg.algo.normalize_advantage_std)
        rollout_metrics["rollout/zero_advantage_group_frac"] = zero_advantage_group_fraction(
            rewards, group_size)
        microbatches = self._microbatches(samples, advantages)
        engine_plan = self._engine_plan(microbatches, samples)
        ministeps = split_ministeps(microbatches, self.cfg.algo.off_policy_window)
        with self._drift_capture("old", [chunk[0].microbatch_id for chunk in ministeps]):
            old = self._old_pass(microbatches, engine_plan)
        metrics = {**rollout_metrics, **self._mismatch(microbatches), "old/entropy":
                   old.metrics["entropy"], **_routing_metrics("routing/old_pass", old.routing)}
        plans = self.method.ministep_plans(self.parts.actor, old, engine_plan)
        metrics.update(self._ministeps(microbatches, plans))
        metrics.update({f"train/{k}": v for k, v in self.parts.actor.nonfinite.metrics().items()})
        metrics.update({"time/train_start_s": train_start, "time/train_end_s": self.rollouts.now()})
        self.rollouts.settle()  # the engine takes no weights while it generates
        self._sync_weights(iteration)
        return metrics

    def _version_lag(self, iteration: int, rollout_metrics: dict) -> dict[str, float]:
        """How many weight versions the batch lags the policy that trains it (iteration - 1);
        more than the schedule allows is a bug in the versioning, never trained on."""
        version = rollout_metrics.get("rollout/weight_version")
        if version is None:
            return {}
        lag = iteration - 1 - int(version)
        if not 0 <= lag <= self.rollouts.max_lag:
            raise RolloutError(f"the rollout batch of iteration {iteration} was generated by "
                               f"weight version {int(version)}, {lag} versions behind the policy "
                               f"(allowed: 0..{self.rollouts.max_lag})")
        return {"rollout/weight_version_lag": float(lag)}

    # ----------------------------------------------------------------------------- phases
    def _old_pass(self, microbatches, engine_plan):
        return self.method.old_logprob_pass(self.parts.actor, microbatches, engine_plan,
                                            self.cfg.algo)

    def _drift_capture(self, phase: str, microbatch_ids):
        """Sample router inputs of these micro-batches in the block (drift attribution)."""
        if self.drift_probe is None:
            return contextlib.nullcontext()
        return self.drift_probe.capture(phase, microbatch_ids)

    def _microbatches(self, samples, advantages):
        dp_group = self.parts.groups.dp
        plan_batch(self.cfg, dp_group.size())
        indices = shard_for_dp(len(samples), dp_group.size(), dp_group.rank())
        layout = grid_layout_of(self.parts)  # the layout the driver cut this rank's routes for
        return build_train_microbatches(samples, indices, advantages, layout.micro_batch_size,
                                        layout.parallel,
                                        int(self.parts.hf_config.get("pad_token_id") or 0),
                                        uniform_width=layout.uniform_width)

    def _engine_plan(self, microbatches, samples):
        if not self.method.uses_engine_routes:
            return None
        if self.route_shape is None:  # no MoE layer on this stage
            return RoutePlan()
        return build_route_plan([mb.grid for mb in microbatches], samples, self.route_shape,
                                layer_numbers=model_layer_numbers(self.parts.model),
                                parallel=self.parts.token_parallel)

    def _mismatch(self, microbatches) -> dict[str, float]:
        if not is_pp_last_stage(self.parts.groups.pp):
            local = None
        else:
            train = torch.cat([mb.old_logp[mb.loss_mask] for mb in microbatches])
            rollout = torch.cat([mb.rollout_logp[mb.loss_mask] for mb in microbatches])
            local = mismatch_metrics(train, rollout, torch.ones_like(train, dtype=torch.bool))
        keys = ["k3_kl", "abs_logprob_diff", "extreme_token_fraction"]
        out = {}
        for key in keys:
            value = None if local is None else float(local[key])
            out[f"mismatch/{key}"] = _allreduce_mean(value)
        return out

    def _ministeps(self, microbatches, ministep_plan) -> dict[str, float]:
        """The mini-steps; ``ministep_plan(m, chunk)`` is mini-step ``m``'s route plan."""
        window = self.cfg.algo.off_policy_window
        mode = self.method.ministep_mode
        train_predictor = self.method.trains_predictor
        metrics, sums, drift = {}, {}, []
        if self.update_probe is not None:
            self.update_probe.begin()
        for m, chunk in enumerate(split_ministeps(microbatches, window)):
            plan = ministep_plan(m, chunk)
            with self._drift_capture("cur", [chunk[0].microbatch_id]):
                result = self.parts.actor.train_ministep(chunk, plan, mode,
                                                         train_predictor=train_predictor and m > 0)
            if self.update_probe is not None:
                self.update_probe.after_ministep()
            if self.drift_probe is not None:
                drift.append(self.drift_probe.reduce(
                    self.drift_probe.ministep_counts(chunk[0].microbatch_id)))
            step_metrics = {**result.metrics, **_routing_metrics("routing", result.routing)}
            for key, value in step_metrics.items():
                sums.setdefault(key, []).append(value)
                if key.startswith("routing/"):
                    metrics[f"{key}/ministep{m + 1}"] = value
                elif key.startswith("rspo_"):
                    metrics[f"train/{key}/ministep{m + 1}"] = value
            if m == window - 1 and _is_rank0():
                metrics.update(_per_layer_metrics(result.routing))
        for key, values in sums.items():
            metrics[f"train/{key}" if not key.startswith("routing/") else key] = \
                sum(values) / len(values)
            if key.startswith("routing/") and len(values) > 1:
                metrics[f"{key}/ministeps_ge2"] = sum(values[1:]) / len(values[1:])
        metrics.update(drift_metrics(drift) if drift else {})
        metrics.update(_degenerate_ministeps(sums))
        metrics.update(self.update_probe.metrics() if self.update_probe is not None else {})
        return metrics

    def _build_weight_syncer(self, rejoining=()):
        """Collective: the syncer for the engine's live servers plus ``rejoining`` (evicted
        servers to sync before they rejoin; rank 0's list) (rank 0 holds the engine)."""
        return build_weight_syncer(self.parts.model, self.source.engine, self.parts.hf_config,
                                   WeightSyncOptions.from_run_config(self.cfg),
                                   groups=self.parts.groups, rejoining=rejoining)

    def _sync_weights(self, version: int) -> None:
        """Collective: push the weights of ``version`` (iterations trained). Evicted servers
        that answer again get this full sync, then rejoin; a failed sync is redone on the
        servers that pass a health check (:mod:`megatron_pr2.training.engine_weight_sync`)."""
        self.weight_sync.sync(version, predictive_gate=self.method.predictive_engine_gate)

    # ----------------------------------------------------------------------------- state
    @staticmethod
    def _due(interval: int, iteration: int) -> bool:
        return bool(interval) and iteration % interval == 0

    def _trainer_state(self, iteration: int) -> dict:
        return {"iteration": iteration, "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "config": self.cfg.to_dict(),
                "data_position": self.rollouts.data_position}

    def _save(self, iteration: int) -> None:
        checkpointing.save_checkpoint(self.cfg.train.save, iteration, self.parts.model,
                                      self.parts.optimizer, self._trainer_state(iteration),
                                      keep_last=self.cfg.train.keep_last)

    def _maybe_resume(self) -> None:
        resumed = checkpointing.resume(self.cfg.train.save, self.parts.model, self.parts.optimizer,
                                       self.cfg.to_dict(), self.cfg.train.allow_resharding)
        if resumed is None:
            return
        state = resumed.state
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.start_iteration = int(state["iteration"])
        self.rollouts.resume_at(int(state.get(
            "data_position", self.start_iteration * self.cfg.rollout.rollout_batch_prompts)))
        logger.info("resuming after iteration %d (data position %d)", self.start_iteration,
                    self.rollouts.data_position)
        if self.start_iteration >= self.cfg.train.train_iters:
            logger.warning("%s is at iteration %d, already at --train-iters %d: nothing left to "
                           "train (raise --train-iters to go on)", resumed.directory,
                           self.start_iteration, self.cfg.train.train_iters)

    def _progress(self, iteration: int, metrics: dict) -> None:
        if not _is_rank0():
            return
        shown = {"reward": metrics.get("rollout/reward_mean"),
                 "kl": metrics.get("mismatch/k3_kl"),
                 "zero_dev": metrics.get("routing/zero_deviation_ratio/ministeps_ge2"),
                 "loss": metrics.get("train/policy_loss"),
                 "s": metrics.get("time/iteration_s")}
        text = " ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None)
        text += nonfinite_summary(metrics)
        logger.info("[%s] iteration %d/%d %s", self.method.name, iteration,
                    self.cfg.train.train_iters, text)

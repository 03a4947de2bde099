"""How long one rollout may take at worst, against the host group's timeout.

While rank 0 generates, every other rank waits for the batch on the gloo host group, whose
collectives time out after ``--distributed-timeout-minutes``. An SGLang request may take up to
``--rollout-timeout`` seconds per attempt, and a request is tried up to the client's attempt
budget; with ``--rollout-max-concurrency`` below the batch size the requests run in waves.
"""

from __future__ import annotations

import math

from megatron_pr2.config import RunConfig
from megatron_pr2.rollout.sglang_client import SGLangClientConfig


def rollout_worst_case_seconds(cfg: RunConfig) -> float:
    """The longest one SGLang rollout batch can take before the client gives up."""
    rollout = cfg.rollout
    client = SGLangClientConfig()
    samples = rollout.rollout_batch_prompts * rollout.n_samples_per_prompt
    waves = math.ceil(samples / (rollout.rollout_max_concurrency or samples))
    backoff = sum(client.backoff * 2**i for i in range(client.max_attempts - 1))
    return waves * (client.max_attempts * rollout.rollout_timeout + backoff)


def host_timeout_problems(cfg: RunConfig) -> list[str]:
    """A rollout that can outlast the host group's timeout, named with the flags to change."""
    if cfg.rollout.rollout_engine != "sglang":
        return []
    worst = rollout_worst_case_seconds(cfg)
    minutes = cfg.parallel.distributed_timeout_minutes
    if worst <= 60 * minutes:
        return []
    waves = worst / (SGLangClientConfig().max_attempts * cfg.rollout.rollout_timeout)
    return [(f"one rollout can take up to {worst:.0f} s (--rollout-timeout "
             f"{cfg.rollout.rollout_timeout:g} s x {SGLangClientConfig().max_attempts} attempts"
             f"{f' x {math.floor(waves)} waves of --rollout-max-concurrency' if waves >= 2 else ''}"
             f"), longer than --distributed-timeout-minutes {minutes} ({60 * minutes} s) that the "
             f"other ranks wait for it: raise --distributed-timeout-minutes to at least "
             f"{math.ceil(worst / 60)} or lower --rollout-timeout")]

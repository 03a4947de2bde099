"""In-process rollout engine: ``transformers`` generation on CPU with routes captured live.

Routes are recorded by forward hooks on every MoE layer's ``mlp.gate`` *during* generation (the
prefill pass and each decode step), never by a second forward, so they are exactly the routes the
engine used. The route layout matches SGLang's: ``[T-1, L_moe, K]`` for a sequence of ``T`` tokens, row
``t`` = the route used when processing input position ``t`` (the last token is never processed);
dense layers have no entry (see :mod:`megatron_pr2.rollout.route_codec`).

Log-probs follow SGLang's convention: greedy -> ``log_softmax(logits)``; sampling ->
``log_softmax(logits / temperature)`` over the full vocabulary (before top-k / top-p).

The engine may run at a lower precision than the trainer (``dtype=torch.bfloat16``), which makes
the train/rollout mismatch real.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterable, Sequence

import torch

from megatron_pr2.rollout.engine import EngineHealth
from megatron_pr2.rollout.hf_weights import load_hf_named_tensors
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample, SampleStatus, SamplingParams
from megatron_pr2.rollout.weight_version import METADATA_KEY

logger = logging.getLogger(__name__)


def build_hf_model(hf_config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised ``transformers`` causal LM for an HF config dict, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hf_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("HF config has no model_type")
    fields.pop("transformers_version", None)
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def _cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's ``forward`` takes its KV cache under: ``cache`` in recent
    transformers (which deprecates ``past_key_values``), ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class RouteRecorder:
    """Forward hooks on the MoE gates that record each forward's top-k expert ids.

    Args:
        model: a ``transformers`` Qwen-MoE causal LM.
        route_shape: which layers are MoE layers, and top-k.
    """

    def __init__(self, model: torch.nn.Module, route_shape: RouteShape):
        self.route_shape = route_shape
        self._calls: dict[int, torch.Tensor] = {}
        self._handles = []
        self.active = False
        layers = model.model.layers
        for slot, index in enumerate(route_shape.moe_layer_indices):
            gate = layers[index].mlp.gate
            self._handles.append(gate.register_forward_hook(self._hook(slot)))

    def _hook(self, slot: int):
        top_k = self.route_shape.top_k

        def record(_module, _inputs, output):
            if not self.active:
                return
            if isinstance(output, tuple):  # transformers >= 5: (logits, scores, indices)
                indices = output[2]
            else:  # older transformers: the gate is a Linear returning logits
                indices = torch.topk(torch.softmax(output.float(), dim=-1), top_k, dim=-1).indices
            if slot in self._calls:
                raise RuntimeError(f"MoE layer slot {slot} ran twice in one forward")
            self._calls[slot] = indices.detach().reshape(-1, top_k)

        return record

    def pop(self, num_rows: int) -> torch.Tensor:
        """The routes of the forward that just ran: ``[num_rows, L_moe, K]`` int64."""
        missing = [s for s in range(self.route_shape.num_moe_layers) if s not in self._calls]
        if missing:
            raise RuntimeError(f"MoE gates of layer slots {missing} did not run in the last forward")
        routes = torch.stack([self._calls[s] for s in range(self.route_shape.num_moe_layers)], dim=1)
        self._calls.clear()
        if routes.shape[0] != num_rows:
            raise RuntimeError(f"gates saw {routes.shape[0]} tokens, expected {num_rows}")
        return routes

    @contextlib.contextmanager
    def recording(self):
        """Record only inside this block (other forwards of the model are left alone)."""
        self._calls.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self._calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sample_next_token(logits: torch.Tensor, sampling: SamplingParams,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token per row of ``[B, V]`` logits; return ``(tokens, log_probs)``."""
    logits = logits.float()
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    scaled = logits / sampling.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    filtered = scaled.clone()
    if sampling.top_k:
        kth = torch.topk(filtered, min(sampling.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered[filtered < kth] = float("-inf")
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(filtered, dim=-1, descending=True)
        mass_before = torch.softmax(ordered, dim=-1).cumsum(dim=-1) - torch.softmax(ordered, dim=-1)
        ordered[mass_before > sampling.top_p] = float("-inf")
        filtered = torch.full_like(filtered, float("-inf")).scatter(1, order, ordered)
    tokens = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator)[:, 0]
    return tokens, log_probs.gather(1, tokens[:, None])[:, 0]


class InProcessEngine:
    """A :class:`~megatron_pr2.rollout.engine.RolloutEngine` running ``transformers`` in this process.

    Args:
        hf_config: the model's HF config dict.
        dtype: inference precision (``torch.bfloat16`` for a real train/rollout mismatch).
        model: an already built HF model for ``hf_config`` (default: built, random weights; load
            real ones with :meth:`update_weights`).
        max_batch_size: prompts per generation batch (left-padded).
        seed: seed of the sampling generator when ``SamplingParams.seed`` is None.
    """

    name = "in-process"

    def __init__(self, hf_config: dict, *, dtype: torch.dtype = torch.float32,
                 model: torch.nn.Module | None = None, max_batch_size: int = 16, seed: int = 0):
        from megatron_pr2.models.hf_config import load_hf_config

        self.hf_config = load_hf_config(hf_config)
        self.route_shape = RouteShape.from_hf_config(self.hf_config)
        self.model = (model if model is not None else build_hf_model(self.hf_config, dtype)).to(dtype).eval()
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_positions = int(self.hf_config.get("max_position_embeddings", 1 << 30))
        self.pad_token_id = int(self.hf_config.get("pad_token_id") or 0)
        eos = self.hf_config.get("eos_token_id")
        self.eos_token_ids = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self._generator = torch.Generator().manual_seed(seed)
        self._recorder = RouteRecorder(self.model, self.route_shape)
        self._cache_kwarg = _cache_keyword(self.model)
        self.weight_version: int | None = None  # of the last completed sync (weight_version.py)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, **kwargs) -> InProcessEngine:
        """An engine with the weights of an HF checkpoint directory."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(path, dtype=dtype, model=model, **kwargs)

    def health(self) -> EngineHealth:
        return EngineHealth({self.name: True})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF checkpoint-named tensors (cast to the engine's dtype)."""
        loaded = load_hf_named_tensors(self.model, named_tensors)
        logger.debug("in-process engine loaded %d tensors", len(loaded))

    def set_weight_version(self, version: int) -> None:
        """The version of the weights just synced; each later sample records it."""
        self.weight_version = version

    def update_weights_from_disk(self, path: str) -> None:
        """Load every tensor of the safetensors files in an HF checkpoint directory."""
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        for file in files:
            with safe_open(os.path.join(path, file), "pt") as handle:
                self.update_weights((name, handle.get_tensor(name)) for name in handle.keys())  # noqa: SIM118 (safe_open has no __iter__)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 return_logprobs: bool = True, return_routed_experts: bool = True,
                 on_sample=None) -> list[Sample]:
        """Generate one continuation per prompt (see the module docstring for the layouts).

        ``on_sample(index, sample)`` is called for each sample once all are generated (this
        engine generates in the caller's thread).
        """
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        samples = []
        with self._recorder.recording():
            for start in range(0, len(prompts), self.max_batch_size):
                batch = prompts[start:start + self.max_batch_size]
                samples.extend(self._generate_batch(batch, sampling, generator))
        for sample in samples:
            if not return_logprobs:
                sample.rollout_log_probs = None
            if not return_routed_experts:
                sample.routed_experts = None
        for index, sample in enumerate(samples):
            if on_sample is not None:
                on_sample(index, sample)
        return samples

    def _check_prompt(self, index: int, prompt: Sequence[int]) -> torch.Tensor:
        tokens = torch.as_tensor(list(prompt), dtype=torch.long)
        vocab = int(self.hf_config["vocab_size"])
        if tokens.numel() == 0:
            raise ValueError(f"prompt {index} is empty")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"prompt {index} has token ids outside [0, {vocab})")
        if tokens.numel() >= self.max_positions:
            raise ValueError(
                f"prompt {index} has {tokens.numel()} tokens; the model has "
                f"{self.max_positions} positions"
            )
        return tokens

    def _stop_ids(self, sampling: SamplingParams) -> set[int]:
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops.update(self.eos_token_ids)
        return stops

    @torch.no_grad()
    def _generate_batch(self, prompts: list[torch.Tensor], sampling: SamplingParams,
                        generator: torch.Generator) -> list[Sample]:
        from transformers import DynamicCache

        batch = len(prompts)
        lengths = [p.numel() for p in prompts]
        width = max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            input_ids[b, width - lengths[b]:] = prompt
            mask[b, width - lengths[b]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        budgets = [min(sampling.max_new_tokens, self.max_positions - n) for n in lengths]
        stops = self._stop_ids(sampling)

        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self._cache_kwarg: cache}).logits[:, -1]
        prefill = self._recorder.pop(batch * width).view(batch, width, *self._route_dims())
        routes = [[prefill[b, width - lengths[b]:]] for b in range(batch)]
        generated: list[list[int]] = [[] for _ in range(batch)]
        log_probs: list[list[float]] = [[] for _ in range(batch)]
        status = [SampleStatus.PENDING] * batch
        last_position = positions[:, -1]
        while True:
            tokens, token_log_probs = sample_next_token(logits, sampling, generator)
            for b in range(batch):
                if status[b] is not SampleStatus.PENDING:
                    continue
                generated[b].append(int(tokens[b]))
                log_probs[b].append(float(token_log_probs[b]))
                if int(tokens[b]) in stops:
                    status[b] = SampleStatus.COMPLETED
                elif len(generated[b]) >= budgets[b]:
                    status[b] = SampleStatus.TRUNCATED
            active = [b for b in range(batch) if status[b] is SampleStatus.PENDING]
            if not active:
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
            last_position = last_position + 1
            logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                position_ids=last_position[:, None], use_cache=True,
                                **{self._cache_kwarg: cache}).logits[:, -1]
            step_routes = self._recorder.pop(batch).view(batch, 1, *self._route_dims())
            for b in active:
                routes[b].append(step_routes[b])
        return [self._make_sample(prompts[b], generated[b], log_probs[b], routes[b], status[b])
                for b in range(batch)]

    def _route_dims(self) -> tuple[int, int]:
        return self.route_shape.num_moe_layers, self.route_shape.top_k

    def _make_sample(self, prompt, generated, log_probs, routes, status) -> Sample:
        tokens = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])
        return Sample(
            tokens=tokens,
            prompt_length=prompt.numel(),
            rollout_log_probs=torch.tensor(log_probs, dtype=torch.float32),
            routed_experts=torch.cat(routes).to(self.route_shape.compact_dtype),
            status=status,
            metadata={"engine": self.name, METADATA_KEY: self.weight_version},
        )

"""State-dict adapter: a model family's key table, bound to one config, streaming both ways.

Megatron names are those of a single-process model's ``state_dict()`` (no TP/PP/EP: global
layer numbers, ``local_experts.{e}`` with the global expert id), e.g.
``decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight``. The distributed
checkpoint layout (see :mod:`megatron_pr2.convert.sharding`) and the trainer's weight sync
both start from these names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.rules import PredictiveGateRule, QkvRule, Shape, TensorRule
from megatron_pr2.models.hf_config import QwenMoeSizes

logger = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]]

# The PR2 evolution predictor W_p of each MoE router (nn.Linear(hidden, num_experts), bias-free,
# stored [E, H]); it exists only on the Megatron side.
PREDICTOR_SUFFIX = "mlp.router.predictor.weight"


def _always(spec: QwenMoeSizes) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class RuleTemplate:
    """One row of a family's key table, with ``{layer}`` / ``{expert}`` placeholders.

    Attributes:
        kind: the rule class (rename, GLU fuse, QKV fuse).
        hf: HF name templates, in the order ``kind`` expects.
        megatron: Megatron name template.
        shapes: expected HF shapes, computed from the parsed config.
        tp_axis: tensor-parallel split axis of the Megatron tensor (None = replicated).
        glu: Megatron tensor is ``[gate; up]``.
        when: whether the row applies to this config (e.g. only with QKV bias).
    """

    kind: type[TensorRule]
    hf: tuple[str, ...]
    megatron: str
    shapes: Callable[[QwenMoeSizes], tuple[Shape, ...]]
    tp_axis: int | None = None
    glu: bool = False
    when: Callable[[QwenMoeSizes], bool] = _always

    def bind(self, spec: QwenMoeSizes, layer: int | None = None,
             expert: int | None = None) -> TensorRule:
        fields = {"layer": layer, "expert": expert}
        extra = {"num_query_groups": spec.num_key_value_heads} if self.kind is QkvRule else {}
        return self.kind(
            hf_names=tuple(name.format(**fields) for name in self.hf),
            megatron_name=self.megatron.format(**fields),
            hf_shapes=tuple(tuple(shape) for shape in self.shapes(spec)),
            tp_axis=self.tp_axis,
            glu=self.glu,
            layer=layer,
            expert=expert,
            **extra,
        )


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A family's key table, split by where each row applies."""

    first: tuple[RuleTemplate, ...]          # before the layers (embedding)
    attention: tuple[RuleTemplate, ...]      # every layer
    dense_mlp: tuple[RuleTemplate, ...]      # dense layers (mlp_only_layers / sparse step)
    moe: tuple[RuleTemplate, ...]            # MoE layers, once per layer (router, shared expert)
    expert: tuple[RuleTemplate, ...]         # MoE layers, once per routed expert
    last: tuple[RuleTemplate, ...]           # after the layers (final norm, lm_head)
    hf_ignored_when_tied: tuple[str, ...] = ("lm_head.weight",)


class StateDictAdapter:
    """HF <-> Megatron tensor mapping for one model config (subclass per family)."""

    architecture: str = ""
    table: KeyTable

    def __init__(self, spec: QwenMoeSizes):
        if spec.architecture != self.architecture:
            raise ConversionError(
                f"{type(self).__name__} converts {self.architecture}, got {spec.architecture}"
            )
        self.spec = spec
        self._rules = self._bind_rules()
        self._by_hf = {name: rule for rule in self._rules for name in rule.hf_names}
        self._by_megatron = {rule.megatron_name: rule for rule in self._rules}

    # ----------------------------------------------------------------- the table, bound
    def _bind_rules(self) -> list[TensorRule]:
        spec, table = self.spec, self.table
        rules = [t.bind(spec) for t in table.first if t.when(spec)]
        for layer, is_moe in enumerate(spec.moe_layer_pattern):
            rules += [t.bind(spec, layer) for t in table.attention if t.when(spec)]
            if not is_moe:
                rules += [t.bind(spec, layer) for t in table.dense_mlp if t.when(spec)]
                continue
            rules += [t.bind(spec, layer) for t in table.moe if t.when(spec)]
            for expert in range(spec.num_experts):
                rules += [t.bind(spec, layer, expert) for t in table.expert if t.when(spec)]
        rules += [t.bind(spec) for t in table.last if t.when(spec)]
        return rules

    @property
    def rules(self) -> list[TensorRule]:
        """All rules in checkpoint order: embedding, layer by layer, final norm, output layer."""
        return list(self._rules)

    def rule_for_megatron(self, megatron_name: str) -> TensorRule | None:
        return self._by_megatron.get(megatron_name)

    def hf_ignored(self, hf_name: str) -> bool:
        """HF tensors that are legitimately present but carry nothing new (tied lm_head)."""
        return self.spec.tie_word_embeddings and hf_name in self.table.hf_ignored_when_tied

    def predictor_name(self, layer: int) -> str:
        return f"decoder.layers.{layer}.{PREDICTOR_SUFFIX}"

    def predictor_names(self) -> list[str]:
        """The PR2 predictor weight of every MoE layer (Megatron-only, optional)."""
        return [self.predictor_name(layer) for layer in self.spec.moe_layer_indices]

    def predictor_shape(self) -> Shape:
        return (self.spec.num_experts, self.spec.hidden_size)

    def predictive_gate_rule(self, router_rule: TensorRule) -> PredictiveGateRule:
        return PredictiveGateRule(router_name=router_rule.megatron_name,
                                  predictor_name=self.predictor_name(router_rule.layer),
                                  hf_name=router_rule.hf_names[0],
                                  shape=router_rule.megatron_shape)

    def is_router(self, rule: TensorRule) -> bool:
        return rule.megatron_name.endswith(".mlp.router.weight")

    # ----------------------------------------------------------------- streaming
    def to_megatron(self, named_tensors: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
        """HF named tensors (any order) -> Megatron named tensors, each as soon as complete.

        Raises:
            ConversionError: unknown HF name, duplicate, shape mismatch, or (at the end) a
                Megatron tensor whose HF sources never arrived.
        """
        pending: dict[str, dict[str, torch.Tensor]] = {}
        done: set[str] = set()
        for name, tensor in named_tensors:
            if self.hf_ignored(name):
                logger.info("ignoring %s (tie_word_embeddings=true)", name)
                continue
            rule = self._by_hf.get(name)
            if rule is None:
                raise ConversionError(
                    f"unexpected HF tensor {name!r}: not in the {self.architecture} key table "
                    "for this config"
                )
            index = rule.hf_names.index(name)
            _check_shape(name, tensor, rule.hf_shapes[index])
            sources = pending.setdefault(rule.megatron_name, {})
            if name in sources or rule.megatron_name in done:
                raise ConversionError(f"HF tensor {name!r} was given twice")
            sources[name] = tensor
            if len(sources) == len(rule.hf_names):
                del pending[rule.megatron_name]
                done.add(rule.megatron_name)
                yield rule.megatron_name, rule.to_megatron([sources[n] for n in rule.hf_names])
        missing = [n for r in self._rules if r.megatron_name not in done for n in r.hf_names
                   if n not in pending.get(r.megatron_name, {})]
        if missing:
            raise ConversionError(_missing_message("HF", missing))

    def to_hf(self, named_tensors: NamedTensors, predictive_gate: bool = False,
              complete: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Megatron named tensors (any order) -> HF named tensors, each as soon as complete.

        Args:
            named_tensors: single-process Megatron names (``_extra_state`` entries are skipped).
            predictive_gate: write ``W_r + W_p`` as each router's HF gate weight (PR2 in the
                rollout engine); needs the predictor weight of every MoE layer.
            complete: require every tensor of the model (False: a part, e.g. one pipeline
                stage's bucket; a gate still needs its router and predictor together).

        Raises:
            ConversionError: unknown name, duplicate, shape mismatch, or missing tensors.
        """
        gates = {}
        if predictive_gate:
            for rule in self._rules:
                if self.is_router(rule):
                    gate = self.predictive_gate_rule(rule)
                    gates[gate.router_name] = gates[gate.predictor_name] = gate
        predictors = set(self.predictor_names())
        pending: dict[str, dict[str, torch.Tensor]] = {}
        done: set[str] = set()
        dropped = 0
        for name, tensor in named_tensors:
            if name.endswith("._extra_state") or tensor is None:
                continue
            if name in gates:
                gate = gates[name]
                shape = gate.shape if name == gate.router_name else self.predictor_shape()
                _check_shape(name, tensor, shape)
                sources = pending.setdefault(gate.hf_name, {})
                _put_once(sources, name, tensor, done)
                if len(sources) == 2:
                    del pending[gate.hf_name]
                    done.update(gate.megatron_names)
                    yield gate.hf_name, gate.to_hf(sources[gate.router_name],
                                                   sources[gate.predictor_name])
                continue
            if name in predictors:
                dropped += 1
                continue
            rule = self._by_megatron.get(name)
            if rule is None:
                raise ConversionError(
                    f"unexpected Megatron tensor {name!r}: not in the {self.architecture} key "
                    "table for this config"
                )
            _check_shape(name, tensor, rule.megatron_shape)
            if name in done:
                raise ConversionError(f"Megatron tensor {name!r} was given twice")
            done.add(name)
            yield from zip(rule.hf_names, rule.to_hf(tensor))
        if dropped:
            # debug: weight sync calls this every step
            logger.debug("dropped %d PR2 predictor weights (no HF counterpart; use "
                         "--predictive-gate to fold them into the gates)", dropped)
        expected = [r.megatron_name for r in self._rules] + sorted(
            {g.predictor_name for g in gates.values()})
        received = done.union(*(sources.keys() for sources in pending.values()))
        missing = [n for n in expected if n not in received]
        if missing and complete:
            raise ConversionError(_missing_message("Megatron", missing))
        if pending and not complete:
            raise ConversionError(f"predictive gates need router and predictor together; "
                                  f"incomplete: {', '.join(sorted(pending)[:4])}")


def _put_once(sources: dict, name: str, tensor: torch.Tensor, done: set) -> None:
    if name in sources or name in done:
        raise ConversionError(f"Megatron tensor {name!r} was given twice")
    sources[name] = tensor


def _check_shape(name: str, tensor: torch.Tensor, shape: Shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"shape mismatch for {name}: got {tuple(tensor.shape)}, the config implies "
            f"{tuple(shape)}"
        )


def _missing_message(side: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
    return f"missing {side} tensors: {shown}"

"""Megatron-Core's TE/Apex fallback warnings are ignored, and nothing else is."""

import warnings

from megatron_pr2.fallbacks import fallback_implementations, quiet_fallback_warnings

# Megatron-Core's own texts (megatron/core/optimizer/__init__.py, models/backends.py)
FALLBACKS = ["Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
             "Apex is not installed. Falling back to Torch Norm"]
OTHER = "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."


def test_only_the_fallback_warnings_are_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_fallback_warnings()
        for text in [*FALLBACKS, OTHER]:
            warnings.warn(text, UserWarning)
        warnings.warn(FALLBACKS[0], DeprecationWarning)  # another category stays visible
    assert [(str(w.message), w.category) for w in caught] == \
        [(OTHER, UserWarning), (FALLBACKS[0], DeprecationWarning)]


def test_implementations_follow_megatrons_order(monkeypatch):
    def installed(*packages):
        monkeypatch.setattr("megatron_pr2.fallbacks._installed",
                            lambda name: name in packages)
        return list(fallback_implementations().values())

    assert installed() == ["torch", "torch"]
    assert installed("apex") == ["apex", "apex"]
    assert installed("transformer_engine") == ["transformer_engine", "torch"]
    assert installed("transformer_engine", "apex") == ["transformer_engine", "apex"]

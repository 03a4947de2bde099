"""Evolution-predictor losses: pure math, one function per variant (docs/method.md, PR2).

All functions take, for ``n`` sampled tokens of one MoE layer, the current router logits
``logits_cur_TE`` (``p_cur``), the logits recorded in the predictive pass ``logits_old_TE``
(``p_old``) and the predictor's output on the recorded hidden states ``delta_TE``
(``h_old W_p``), and return the per-token loss ``[n]``. The targets (``p_cur``, ``p_old``) are
detached here, so only ``delta_TE`` (hence only ``W_p``) receives a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl_from_logits(target_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(target) || softmax(model))`` in fp32."""
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    model_logp = F.log_softmax(model_logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - model_logp)).sum(dim=-1)


def kl_post_loss(logits_cur_TE, logits_old_TE, delta_TE) -> torch.Tensor:
    """``KL(sg softmax(p_cur) || softmax(p_old + delta))`` per token (the default)."""
    return _kl_from_logits(logits_cur_TE.detach(), logits_old_TE.detach().float() + delta_TE.float())


def kl_delta_loss(logits_cur_TE, logits_old_TE, delta_TE) -> torch.Tensor:
    """``KL(sg softmax(p_cur - p_old) || softmax(delta))`` per token."""
    drift = logits_cur_TE.detach().float() - logits_old_TE.detach().float()
    return _kl_from_logits(drift, delta_TE)


def l2_loss(logits_cur_TE, logits_old_TE, delta_TE) -> torch.Tensor:
    """``mean_e (delta - (p_cur - p_old))^2`` per token."""
    drift = logits_cur_TE.detach().float() - logits_old_TE.detach().float()
    return (delta_TE.float() - drift).pow(2).mean(dim=-1)


PREDICTOR_LOSSES = {
    "kl-post": kl_post_loss,
    "kl": kl_delta_loss,
    "l2": l2_loss,
}


def predictor_loss_fn(name: str):
    """The per-token loss function for a variant name (``kl-post``, ``kl``, ``l2``)."""
    try:
        return PREDICTOR_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown predictor loss {name!r}; choose one of {', '.join(PREDICTOR_LOSSES)}"
        ) from None


def predictor_loss(name: str, logits_cur_TE, logits_old_TE, delta_TE) -> torch.Tensor:
    """Per-token predictor loss ``[n]`` of variant ``name``; shapes must all be ``[n, E]``."""
    shapes = {tuple(t.shape) for t in (logits_cur_TE, logits_old_TE, delta_TE)}
    if len(shapes) != 1 or logits_cur_TE.dim() != 2:
        raise ValueError(
            "predictor loss needs p_cur, p_old and delta of one shape [n, E]; got "
            f"{tuple(logits_cur_TE.shape)}, {tuple(logits_old_TE.shape)}, {tuple(delta_TE.shape)}"
        )
    return predictor_loss_fn(name)(logits_cur_TE, logits_old_TE, delta_TE)

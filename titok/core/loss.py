"""Selective cross-entropy: train the target LoRA only on the tokens the filters kept.

Token weights are in [0, 1]: 1/0 for a same-tokenizer keep mask, fractions after cross-tokenizer
alignment (a target token covering a kept and a dropped source token gets 0.5).

Two normalizations:
- ``"selected_mean"`` (default): sum(w * CE) / sum(w), the mean over selected tokens. Its scale does
  not depend on k or on how many tokens a batch happens to keep.
- ``"rho1"``: sum(w * CE) / (k * N_response), Rho-1's and the official release's normalization; it
  equals the selected mean when exactly a k fraction of the batch's response tokens is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titok.choices import Normalization

__all__ = ["Normalization", "normalize", "selected_cross_entropy", "selective_cross_entropy"]


def selective_cross_entropy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    token_weights: torch.Tensor,
    response_mask: torch.Tensor,
    normalization: Normalization = "selected_mean",
    k: float | None = None,
) -> torch.Tensor:
    """Weighted next-token CE.

    logits: (B, T, V); input_ids, token_weights, response_mask: (B, T), aligned with input_ids, so
    ``token_weights[b, t]`` weighs the prediction of ``input_ids[b, t]`` from position t - 1.
    Positions outside ``response_mask`` never count, whatever their weight.
    """
    weights = (token_weights * response_mask)[:, 1:].float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(weights)
    # where() rather than a product: a weight of 0 must cut the gradient even if CE is inf.
    total = torch.where(weights > 0, ce * weights, torch.zeros_like(ce)).sum()
    return normalize(total, weights, response_mask[:, 1:], normalization, k)


def selected_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * CE) over selected predictions only: logits (N, V), targets and weights (N,), every
    weight > 0 (the LM head ran on these N positions alone); ``normalize`` divides it."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights.float()).sum()


def normalize(total: torch.Tensor, weights: torch.Tensor, predicts_response: torch.Tensor,
              normalization: Normalization = "selected_mean", k: float | None = None) -> torch.Tensor:
    """The weighted CE sum over one batch divided as ``normalization`` says. ``weights`` are the
    selected predictions' weights (any shape), ``predicts_response`` marks every response prediction."""
    if normalization == "selected_mean":
        return total / weights.float().sum().clamp(min=1e-8)
    if normalization == "rho1":
        if k is None or not 0.0 < k <= 1.0:
            raise ValueError(f"rho1 normalization needs k in (0, 1], got {k!r}")
        return total / (k * predicts_response.sum()).clamp(min=1e-8)
    raise ValueError(f"normalization must be 'selected_mean' or 'rho1', got {normalization!r}")

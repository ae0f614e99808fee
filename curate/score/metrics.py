"""Per-example scores from proxy outputs: pure torch functions, no I/O, no devices.

Shapes: B = batch, C = classes, E = epochs, H = heads, N = tokens (prefix + patches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def example_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """loss, margin, el2n, entropy, pred, confidence for logits (B, C) and labels (B,).

    Labels < 0 (unknown) give NaN for the label-dependent scores.
    """
    logits = logits.float()
    probs = logits.softmax(-1)  # (B, C)
    known = labels >= 0
    y = labels.clamp(min=0)
    onehot = F.one_hot(y, logits.shape[-1]).to(probs.dtype)
    p_y = probs.gather(1, y[:, None])[:, 0]
    p_other = probs.masked_fill(onehot.bool(), float("-inf")).amax(-1)
    nan = torch.full_like(p_y, float("nan"))
    confidence, pred = probs.max(-1)
    return {
        "loss": torch.where(known, F.cross_entropy(logits, y, reduction="none"), nan),
        "margin": torch.where(known, p_y - p_other, nan),
        "el2n": torch.where(known, (probs - onehot).norm(dim=-1), nan),
        "entropy": -(probs * logits.log_softmax(-1)).sum(-1),
        "pred": pred,
        "confidence": confidence,
    }


def forgetting_counts(correct: torch.Tensor) -> torch.Tensor:
    """Forgetting events (Toneva et al. 2019) from per-epoch correctness (E, N) bool.

    A forgetting event is correct at epoch e and incorrect at e + 1. An example never classified
    correctly gets E, more than any example that was learned can reach (at most E // 2 events),
    so "never learned" ranks as the most forgettable.
    """
    events = (correct[:-1] & ~correct[1:]).sum(0)
    never = ~correct.any(0)
    return torch.where(never, torch.full_like(events, correct.shape[0]), events)


def attention_rollout(attns: list[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of the CLS token over patches: (B, N - num_prefix).

    attns: per block, post-softmax attention (B, H, N, N). Heads averaged, the residual path
    added as identity and rows renormalised, then the blocks' matrices multiplied in order.
    """
    result = None
    for attn in attns:
        a = attn.float().mean(1)  # (B, N, N)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None, "attention_rollout needs at least one block"
    return result[:, 0, num_prefix:]


def to_grid(patch_scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch scores (B, gh*gw) in token order (row-major) -> float16 maps (B, gh, gw) that sum to 1."""
    scores = patch_scores.float().clamp(min=0)
    scores = scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)
    return scores.reshape(-1, *grid).half()


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC of `scores` for the boolean `positive` (ties count half), by the rank-sum formula."""
    scores = scores.double()
    ranks = _average_ranks(scores)
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative examples")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    sorted_x, order = x.sort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=x.dtype).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts)[inverse]
    return ranks

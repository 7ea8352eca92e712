"""Losses on continuation log-probs: SFT, ORPO (arXiv:2403.07691), DPO (arXiv:2305.18290).

All take per-token log-probs of the continuation tokens (what the model assigned to the
tokens that were actually there) and return a scalar to minimise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_logprobs", "sft_loss", "orpo_loss", "dpo_loss"]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token: logits [T, V] (position t predicts targets[t]),
    targets [T] -> [T] (float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.view(-1, 1)).view(-1)


def sft_loss(logp: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the continuation: logp [T] -> scalar."""
    return -logp.mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near both 0 and -inf."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO: SFT on the chosen answer plus λ · -log σ(log odds ratio).

    chosen_logp [Tc], rejected_logp [Tr]: per-token log-probs. The odds use the
    length-normalised (mean per-token) log-probability of each answer, as in the paper.
    Returns (loss, log_odds_ratio), both scalars.
    """
    mean_c, mean_r = chosen_logp.mean(), rejected_logp.mean()
    log_odds = (mean_c - _log1mexp(mean_c)) - (mean_r - _log1mexp(mean_r))
    return sft_loss(chosen_logp) - lam * F.logsigmoid(log_odds), log_odds.detach()


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
             ref_chosen_logp: torch.Tensor | float, ref_rejected_logp: torch.Tensor | float,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: -log σ(β · ((π_c - ref_c) - (π_r - ref_r))) on summed sequence log-probs.

    chosen_logp [Tc], rejected_logp [Tr]: per-token log-probs under the policy;
    ref_*: the reference model's summed log-probs of each answer.
    Returns (loss, reward margin β·(...)), both scalars.
    """
    margin = beta * ((chosen_logp.sum() - ref_chosen_logp) - (rejected_logp.sum() - ref_rejected_logp))
    return -F.logsigmoid(margin), margin.detach()

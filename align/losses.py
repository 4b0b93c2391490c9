"""Pure tensor math for PPO: masked statistics, KL estimators, GAE, the clipped losses.

Notation (all tensors on response tokens only):
    B       rollouts in a batch          T   response length (padded)
    mask    (B, T) 1 for real response tokens, 0 after the first EOS / padding
    logp    (B, T) log pi(a_t | s_t) of the sampled token under the current policy
    values  (B, T) V(s_t), the value of the state before token t is generated
No function here touches a model; every one is tested against numbers worked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "abs"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (over `dim`, or everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total: Callable = _local) -> torch.Tensor:
    """Variance of the masked entries of `x` (Bessel-corrected unless `unbiased=False`).

    `total` sums a tensor over every process holding a shard of the batch (the identity on one)."""
    return _masked_moments(x, mask, unbiased, total)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total: Callable = _local) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every shard, see masked_var); masked-out entries come back as 0.

    With shift_mean=False only the scale changes (used for rewards, whose sign carries meaning).
    """
    mean, var = _masked_moments(x, mask, True, total)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _masked_moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool, total: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    count = total(mask.sum())
    mean = total((x * mask).sum()) / count.clamp(min=1)
    var = total((((x - mean) ** 2) * mask).sum()) / count.clamp(min=1)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return mean, var


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi. Shape: as the inputs, (B, T).

    With log r = ref_logp - logp (http://joschu.net/blog/kl-approx.html):
      k1 = -log r                 unbiased, high variance, can be negative per token
      k2 = (log r)^2 / 2          biased, low variance, always >= 0
      k3 = (r - 1) - log r        unbiased, low variance, always >= 0
      abs = |log r|
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}")


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last one.

    scores (B,), or (B, T) for dense rewards (a process reward model's step scores, each on the
    token that ends its step), added where they stand; kl and mask (B, T). Returns (rewards,
    non_score_rewards), both (B, T). InstructGPT eq. 2 (Ouyang et al. 2022), per token as in
    Ziegler et al. 2019.
    """
    non_score = -kl_coef * kl * mask
    if scores.dim() == 2:
        return non_score + scores.to(non_score.device) * mask, non_score
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.device)
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16). Returns (advantages, returns), (B, T).

      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        (V after the last real token is 0)
      A_t     = delta_t + gamma * lam * A_{t+1}
      returns = A_t + V(s_t)
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        # Padding steps carry nothing backwards: the episode ended before them.
        next_advantage = next_advantage * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise. Scalar.

    Also returns clip fraction and approximate KL(old || new) = mean((ratio - 1) - log ratio).
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean. Scalar."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token]: (B, T, V), (B, T) -> (B, T), without a (B, T, V) copy in logp."""
    logits = logits.float() / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) over masked entries; 1 is perfect, <= 0 is useless."""
    var_target = masked_var(target, mask)
    return 1 - masked_var(target - predicted, mask) / var_target.clamp(min=1e-8)


class AdaptiveKLController:
    """Adjusts the KL coefficient towards a target KL (Ziegler et al. 2019, section 2.2).

      e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> None:
        self.update_batch(x.numel(), x.mean().item(), x.var(unbiased=False).item())

    def update_sums(self, count: float, total: float, total_squares: float) -> None:
        """The same update from a batch's count, sum and sum of squares (which add up over processes)."""
        if count:
            mean = total / count
            self.update_batch(count, mean, max(total_squares / count - mean**2, 0.0))

    def update_batch(self, batch_count: float, batch_mean: float, batch_var: float) -> None:
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

"""The GRPO / GSPO policy loss and the train/inference importance-sampling correction, as pure functions.

Notation (one micro-batch of B completions, T completion positions):

* ``logp``  = log π_θ(o_t | q, o_<t), the policy being trained (``per_token_logps``, carries the gradient)
* ``old``   = log π_old, the policy that produced the rollout, as scored by the trainer
* ``samp``  = log π_sampler, the same tokens as scored by the rollout engine (vLLM) while sampling
* ``ref``   = log π_ref, the reference policy (LoRA disabled) for the KL penalty
* ``m``     = the loss mask (completion tokens; 0 for padding and, with ``mask_truncated_completions``, for every
  token of a completion that hit ``max_completion_length``)
* ``A``     = the advantage of the completion, ``[B]`` (or ``[B, T]``)

The semantics are TRL 1.16's ``GRPOTrainer`` (``_compute_loss`` and the importance-sampling part of
``_generate_and_score_completions``); ``tests/test_loss_trl.py`` runs TRL's own code on the same tensors and
checks loss and gradient agree. Where the two differ on purpose it is said in the docstring below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rlcore.config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, validate_loss_fields
from rlcore.config import VLLM_IS_MODES as IS_MODES

# loss types that divide by the active tokens of the whole accumulated batch (``num_items_in_batch``)
TOKEN_SUM_NORMALISED = ("dapo", "cispo")
# loss types whose surrogate is the PPO-style clipped one (clip-fraction metrics are defined for these)
CLIPPED_SURROGATE = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass(frozen=True)
class LossSettings:
    """The GRPOConfig fields the loss reads. Build it with :meth:`from_config`; validated at construction by
    :func:`rlcore.config.validate_loss_fields`, the same check as GRPOConfig's.

    ``epsilon_high`` defaults to ``epsilon`` for every loss type, as in TRL. For ``cispo`` it is the absolute cap
    on the ratio, so leaving it unset caps every weight at ``epsilon`` (0.2): the gradient is then uniformly
    scaled by 0.2 instead of truncated. Set it (ScaleRL recommends 5.0) when using cispo.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon
    delta: float | None = None
    use_bias_correction_kl: bool = True
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    max_completion_length: int = 512
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    # grpo_loss drops every token of a truncated completion from completion_mask (see loss_mask)
    mask_truncated_completions: bool = False

    def __post_init__(self) -> None:
        validate_loss_fields(self)

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        """``epsilon_high``, defaulting to ``epsilon``."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def from_config(cls, config: Any) -> LossSettings:
        """Picks the loss fields of a :class:`rlcore.config.GRPOConfig` (or any object with TRL's field names)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------- building blocks
def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor | None,
              mask_truncated_completions: bool) -> torch.Tensor:
    """The tokens the loss reads, ``[B, T]``: m_t = c_t · (1 − truncated) with ``mask_truncated_completions``
    (a completion cut at max_completion_length teaches nothing about how to end), else m_t = c_t, where c is
    ``completion_mask`` (1 on completion tokens, 0 on padding) and ``truncated`` is ``[B]`` bool."""
    if not mask_truncated_completions:
        return completion_mask
    return completion_mask * (~truncated.bool()).to(completion_mask.dtype).unsqueeze(1)


def log_importance_weights(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor,
                           level: str) -> torch.Tensor:
    """log of the importance ratio π_θ / π_old.

    * ``"token"``:    log r_t = logp_t − old_t, shape ``[B, T]``
    * ``"sequence"`` (GSPO): log s = Σ_t m_t (logp_t − old_t) / max(1, Σ_t m_t), shape ``[B, 1]``;
      s = exp(mean log-ratio) is the length-normalised sequence likelihood ratio.
    """
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        # where, not multiply: a non-finite value at a padded position must not leak into the sum
        summed = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
        return summed / mask.sum(-1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"importance_sampling_level={level!r} is not allowed: expected one of "
                     f"{IMPORTANCE_SAMPLING_LEVELS}")


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1  (≥ 0, unbiased under π_θ)."""
    diff = ref_per_token_logps - per_token_logps
    return torch.exp(diff) - diff - 1


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                      delta: float | None = None) -> torch.Tensor:
    """PPO/GRPO clipped objective, negated to a loss.

    loss = −min(r̃·A, clip(r, 1 − ε_low, 1 + ε_high)·A), with r̃ = min(r, δ) when ``delta`` is set (two-sided
    clipping: a negative-advantage token whose ratio exploded cannot push the loss without bound) and r̃ = r
    otherwise.
    """
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def cispo_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, per_token_logps: torch.Tensor,
                    epsilon_high: float) -> torch.Tensor:
    """CISPO: loss = −sg(min(r, ε_high))·A·logp.

    The ratio is clipped and detached, so every token keeps a REINFORCE gradient scaled by the clipped weight
    instead of being dropped. As in TRL (and ScaleRL), ``epsilon_high`` is the cap itself (e.g. 5.0), not 1 + ε.
    """
    return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps


def sapo_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float,
                   temperature_neg: float) -> torch.Tensor:
    """SAPO soft gate: loss = −(4/τ)·σ(τ(r − 1))·A, τ = τ_pos if A > 0 else τ_neg.

    The gate has slope 1 at r = 1 (same gradient as the unclipped objective on-policy) and decays smoothly
    away from it instead of a hard clip.
    """
    temperatures = torch.where(advantages > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    return -torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures * advantages


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """Keeps the ``top_quantile`` fraction of active tokens with the highest entropy (the "80/20" rule).

    threshold = quantile({H_t : m_t = 1}, 1 − top_quantile) (linear interpolation); keep = (H_t ≥ threshold) ∧ m_t.
    The quantile is over this micro-batch's active tokens (TRL gathers them over processes). Returns a bool
    ``[B, T]``; all False when no token is active.
    """
    active = mask.bool()
    values = entropies[active]
    if values.numel() == 0:
        return torch.zeros_like(active)
    if values.dtype not in (torch.float32, torch.float64):  # quantile has no half-precision kernel
        values = values.float()
    threshold = torch.quantile(values, 1.0 - top_quantile)
    return (entropies * mask >= threshold) & active


def off_policy_sequence_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor,
                             sampling_per_token_logps: torch.Tensor, mask: torch.Tensor,
                             threshold: float) -> torch.Tensor:
    """Off-policy sequence mask (DeepSeek-V3.2): drop a completion when A < 0 and it drifted too far.

    keep_i = (A_i ≥ 0) ∨ (Σ_t m_t (samp_t − logp_t) / max(1, Σ_t m_t) ≤ threshold), as a float ``[B, 1]``.
    Tokens the engine could not score (NaN) count as zero drift.
    """
    drift = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    drift = torch.where(mask.bool(), drift, torch.zeros_like(drift))
    mean_drift = drift.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return ((advantages >= 0) | (mean_drift <= threshold)).to(per_token_logps.dtype)


def sampler_mismatch(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """How far the rollout engine's distribution is from the trainer's, on the sampled (active, finite) tokens.

    With Δ = train − samp: ``logp_diff_mean`` = mean |Δ|, ``logp_diff_max`` = max |Δ|, and ``kl`` = mean of
    exp(Δ) − Δ − 1, the k3 estimate of KL(π_sampler ‖ π_train) from samples of the sampler. Zeros when no token
    qualifies.
    """
    delta = (train_logps - sampling_logps).detach()
    if delta.numel() == 0:  # a shape, known on the host
        zero = torch.zeros((), dtype=train_logps.dtype, device=train_logps.device)
        return {"logp_diff_mean": zero, "logp_diff_max": zero, "kl": zero}
    keep = mask.bool() & torch.isfinite(delta)
    # masked reductions, no boolean indexing: the result stays on the device (no host synchronisation)
    delta = torch.where(keep, delta, torch.zeros_like(delta))
    count = keep.sum().to(delta.dtype).clamp(min=1.0)
    absolute = delta.abs()
    return {"logp_diff_mean": absolute.sum() / count, "logp_diff_max": absolute.max(),
            "kl": (torch.exp(delta) - delta - 1).sum() / count}


@torch.no_grad()
def importance_sampling_correction(old_per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor,
                                   mask: torch.Tensor, *, mode: str = "sequence_mask",
                                   clip_min: float | None = None, clip_max: float | None = 3.0,
                                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated / masked importance-sampling weights that correct for the engine ≠ trainer mismatch.

    Call it once per generation, after scoring the rollout with the trainer *before* any update (the ``old``
    log-probs; with num_iterations = 1 those are the policy's own), and pass the result as ``importance_weights``
    to every :func:`grpo_loss` call on that generation. ``mask`` is the loss mask (with truncated completions
    already zeroed if they are masked).

    With d_t = m_t (old_t − samp_t) (NaN, i.e. a token the engine could not score, → 0):

    * ``token_*``:    w_t = exp(d_t), shape ``[B, T]``
    * ``sequence_*``: w = exp(Σ_t d_t) = Π_t π_old/π_sampler, shape ``[B, 1]``
    * ``*_truncate``: w ← clamp(w, clip_min, clip_max)  (truncated IS)
    * ``*_mask``:     w ← 0 where w < clip_min or w > clip_max (masked IS; a missing bound is no bound)

    Returns (weights, metrics): the min / mean / max weight (over active tokens for token modes, over
    completions for sequence modes), the fraction of zeroed (``*_mask``) or clamped (``*_truncate``) entries,
    and :func:`sampler_mismatch`'s ``logp_diff_mean`` / ``logp_diff_max`` / ``kl``.
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode={mode!r} is not allowed: expected one of {IS_MODES}")
    _same_shape(old_per_token_logps, "old_per_token_logps", sampling_per_token_logps, "sampling_per_token_logps")
    _same_shape(old_per_token_logps, "old_per_token_logps", mask, "mask")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode={mode!r} needs clip_min or clip_max")
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)
    sequence_level = mode.startswith("sequence")
    log_weights = diff.sum(-1, keepdim=True) if sequence_level else diff
    weights = torch.exp(log_weights)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (weights < low) | (weights > high)
    if mode.endswith("truncate"):
        weights = torch.clamp(weights, min=clip_min, max=clip_max)
    else:
        weights = weights.masked_fill(outside, 0.0)
    # statistics over completions (sequence modes) or active tokens (token modes), as masked reductions so
    # that nothing waits for the device; all zero when there is nothing to count
    active = torch.ones_like(weights, dtype=torch.bool) if sequence_level else mask.bool()
    count = active.sum()
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    if weights.numel() == 0:
        lowest = highest = zero
    else:
        lowest = torch.where(count > 0, torch.where(active, weights, math.inf).min(), zero)
        highest = torch.where(count > 0, torch.where(active, weights, -math.inf).max(), zero)
    metrics: dict[str, torch.Tensor] = {
        "min": lowest,
        "mean": torch.where(active, weights, 0.0).sum() / count.clamp(min=1),
        "max": highest,
        "fraction_corrected": (active & outside).sum().to(weights.dtype) / count.clamp(min=1),
    }
    metrics.update(sampler_mismatch(old_per_token_logps, sampling_per_token_logps, mask))
    return weights, metrics


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
              num_items_in_batch: float | torch.Tensor | None = None, max_completion_length: int | None = None,
              gradient_accumulation_steps: int = 1) -> torch.Tensor:
    """Reduces the per-token loss ``ℓ`` (``[B, T]``, or ``[B, 1]`` at sequence level) to the micro-batch loss.

    With S_i = Σ_t m_t ℓ_it, L_i = Σ_t m_t, G = ``gradient_accumulation_steps``:

    * ``grpo``, ``sapo``:  (1/B) Σ_i S_i / max(1, L_i) / G      (per-sequence mean, then batch mean)
    * ``bnpo``:            Σ_i S_i / max(1, Σ_i L_i) / G          (active tokens of this micro-batch)
    * ``dr_grpo``:         Σ_i S_i / (B · max_completion_length) / G
    * ``dapo``, ``cispo``: Σ_i S_i / max(1, num_items_in_batch)  (active tokens of the whole accumulated batch)
    * ``luspo``:           (1/B) Σ_i S_i / G                      (sequence loss scaled by its length)

    Every variant is scaled so that summing the gradients of the G micro-batches of one optimizer step gives
    the gradient of the step's loss; ``dapo``/``cispo`` get that from ``num_items_in_batch`` covering all G.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not allowed: expected one of {LOSS_TYPES}")
    per_token_loss = per_token_loss.expand(mask.shape) if per_token_loss.shape[-1] == 1 else per_token_loss
    summed = torch.where(mask.bool(), per_token_loss, torch.zeros_like(per_token_loss))
    tokens = mask.to(per_token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        return (summed.sum(-1) / tokens.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    if loss_type == "bnpo":
        return summed.sum() / tokens.sum().clamp(min=1.0) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length is required for loss_type='dr_grpo'")
        return summed.sum() / (per_token_loss.shape[0] * max_completion_length) / gradient_accumulation_steps
    if loss_type in TOKEN_SUM_NORMALISED:
        if num_items_in_batch is None:
            raise ValueError(f"num_items_in_batch is required for loss_type={loss_type!r}: the number of active "
                             "completion tokens over every micro-batch of the optimizer step")
        if isinstance(num_items_in_batch, torch.Tensor):
            return summed.sum() / num_items_in_batch.to(per_token_loss.dtype).clamp(min=1.0)
        # a Python number divides as it is: no tensor made from it, so no host-to-device copy per micro-step
        return summed.sum() / max(1.0, float(num_items_in_batch))
    return summed.sum(-1).mean() / gradient_accumulation_steps  # luspo


# ---------------------------------------------------------------------------------------------- the loss
def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    settings: LossSettings,
    importance_weights: torch.Tensor | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / GSPO / DAPO / Dr. GRPO / BNPO / CISPO / SAPO / LUSPO loss of one micro-batch.

    Args:
        per_token_logps: ``[B, T]`` log π_θ of the completion tokens, with grad.
        old_per_token_logps: ``[B, T]`` log π_old, or None when on-policy (then ``per_token_logps.detach()``:
            the ratio is 1 but its gradient is ∇logp).
        ref_per_token_logps: ``[B, T]`` log π_ref; required when ``settings.beta > 0``.
        advantages: ``[B]`` (or ``[B, T]``).
        completion_mask: ``[B, T]``, 1 on completion tokens (a caller holding the final :func:`loss_mask`, such as
            :class:`rlcore.rollout_batch.RolloutBatch`, passes it here with ``mask_truncated_completions`` off).
        importance_weights: engine-mismatch weights from :func:`importance_sampling_correction` (``[B, T]`` or
            ``[B, 1]``), multiplied into the policy term; None when the correction is off.
        sampling_per_token_logps: ``[B, T]`` the engine's log-probs. Used by ``off_policy_mask_threshold``
            (falls back to ``old_per_token_logps`` when None, as TRL does) and for the mismatch metrics.
        entropies: ``[B, T]`` per-token entropies; required when ``settings.top_entropy_quantile < 1``.
        truncated: ``[B]`` bool, completions that hit max_completion_length; required when
            ``settings.mask_truncated_completions``, which drops all their tokens from the loss.
        num_items_in_batch: for ``dapo``/``cispo``, the active tokens (after truncation masking) summed over
            every micro-batch whose gradients make up this optimizer step (all processes' tokens divided by
            the number of processes when gradients are averaged across processes). TRL instead passes the
            generation batch's count scaled by gradient_accumulation_steps / steps_per_generation, i.e. the
            *average* window; the two agree whenever a window is a whole generation (steps_per_generation
            == gradient_accumulation_steps, the default), and the exact count is used here otherwise.
        gradient_accumulation_steps: micro-batches per optimizer step (divides the other loss types).

    Per token, with r the importance ratio (token or sequence level, see :func:`log_importance_weights`),
    the policy term ℓ is :func:`clipped_surrogate` (grpo, bnpo, dr_grpo, dapo, luspo), :func:`cispo_surrogate`
    or :func:`sapo_surrogate`; then ℓ ← ℓ · offpolicy_mask · entropy_mask · importance_weights, and with β > 0
    ℓ ← ℓ + β · KL_t where KL_t = :func:`k3_kl` (× r when ``use_bias_correction_kl``: the k3 estimate is then
    unbiased under π_old, whose samples these are). :func:`aggregate` reduces ℓ to the loss.

    Returns (loss, metrics); metrics are detached 0-dim tensors: ``clip_ratio_low`` / ``_high`` / ``_region``
    (fraction of active tokens — of completions at sequence level — where the clip removes the gradient:
    r < 1 − ε_low with A < 0, r > 1 + ε_high with A > 0), ``cispo_clip_ratio``, ``importance_ratio_mean`` /
    ``_max``, ``kl`` (β > 0), ``entropy`` (when given), ``active_tokens``, and with sampling log-probs given
    ``sampler_logp_diff_mean`` / ``_max`` and ``sampler_kl`` (current policy vs engine, see
    :func:`sampler_mismatch`).

    The clip-fraction metrics use the ratio before the ``delta`` cap; TRL uses it after, which only differs
    when delta < 1 + epsilon_high. The loss and its gradient equal TRL's.
    """
    s = settings
    _check_inputs(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
                  importance_weights, sampling_per_token_logps, entropies, truncated, s)
    mask = loss_mask(completion_mask, truncated, s.mask_truncated_completions).to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(per_token_logps.dtype)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()

    log_weights = log_importance_weights(per_token_logps, old_per_token_logps, mask, s.importance_sampling_level)
    ratio = torch.exp(log_weights)

    if s.loss_type == "cispo":
        per_token_loss = cispo_surrogate(ratio, advantages, per_token_logps, s.epsilon_upper)
    elif s.loss_type == "sapo":
        per_token_loss = sapo_surrogate(ratio, advantages, s.sapo_temperature_pos, s.sapo_temperature_neg)
    else:
        per_token_loss = clipped_surrogate(ratio, advantages, s.epsilon_low, s.epsilon_upper, s.delta)

    if s.off_policy_mask_threshold is not None:
        reference = sampling_per_token_logps if sampling_per_token_logps is not None else old_per_token_logps
        per_token_loss = per_token_loss * off_policy_sequence_mask(
            advantages, per_token_logps, reference, mask, s.off_policy_mask_threshold)
    if s.top_entropy_quantile < 1.0:
        per_token_loss = per_token_loss * high_entropy_mask(entropies, mask, s.top_entropy_quantile)
    if importance_weights is not None:
        per_token_loss = per_token_loss * importance_weights.to(per_token_loss.dtype)
    per_token_kl = None
    if s.beta != 0.0:
        per_token_kl = k3_kl(per_token_logps, ref_per_token_logps)
        if s.use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + s.beta * per_token_kl

    loss = aggregate(per_token_loss, mask, s.loss_type, num_items_in_batch=num_items_in_batch,
                     max_completion_length=s.max_completion_length,
                     gradient_accumulation_steps=gradient_accumulation_steps)
    metrics = _metrics(ratio.detach(), advantages, mask, per_token_kl, entropies, per_token_logps,
                       sampling_per_token_logps, s)
    return loss, metrics


# ---------------------------------------------------------------------------------------------- helpers
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over active tokens for ``[B, T]``; over completions for ``[B, 1]`` (sequence level)."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.mean()
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() / mask.sum().clamp(min=1.0)


def _metrics(ratio, advantages, mask, per_token_kl, entropies, per_token_logps, sampling_per_token_logps,
             s: LossSettings) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"active_tokens": mask.sum().detach()}
    if s.loss_type in CLIPPED_SURROGATE:
        low = ((ratio < 1 - s.epsilon_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + s.epsilon_upper) & (advantages > 0)).to(mask.dtype)
        out["clip_ratio_low"] = _masked_mean(low, mask)
        out["clip_ratio_high"] = _masked_mean(high, mask)
        out["clip_ratio_region"] = _masked_mean(torch.maximum(low, high), mask)
    elif s.loss_type == "cispo":
        out["cispo_clip_ratio"] = _masked_mean(((ratio > s.epsilon_upper) & (advantages > 0)).to(mask.dtype), mask)
    out["importance_ratio_mean"] = _masked_mean(ratio, mask)
    if ratio.numel() == 0:
        out["importance_ratio_max"] = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    elif ratio.shape[-1] == 1:  # sequence level: over completions
        out["importance_ratio_max"] = ratio.max()
    else:  # over active tokens, 1 when there is none (a masked max: no host synchronisation)
        active = mask.bool()
        largest = torch.where(active, ratio, -math.inf).max()
        out["importance_ratio_max"] = torch.where(active.any(), largest, torch.ones_like(largest))
    if per_token_kl is not None:
        out["kl"] = _masked_mean(per_token_kl.detach(), mask)
    if entropies is not None:
        out["entropy"] = _masked_mean(entropies.detach().to(mask.dtype), mask)
    if sampling_per_token_logps is not None:
        for key, value in sampler_mismatch(per_token_logps, sampling_per_token_logps, mask).items():
            out[f"sampler_{key}"] = value
    return {k: v.detach() for k, v in out.items()}


def _same_shape(reference: torch.Tensor, reference_name: str, other: torch.Tensor, name: str) -> None:
    if not isinstance(other, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(other).__name__}")
    if other.shape != reference.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)}, expected {tuple(reference.shape)} "
                         f"(the shape of {reference_name})")


def _check_inputs(per_token_logps, old, ref, advantages, completion_mask, importance_weights, sampling, entropies,
                  truncated, s: LossSettings) -> None:
    if not isinstance(s, LossSettings):
        raise ValueError(f"settings must be a LossSettings, got {type(s).__name__}")
    if not isinstance(per_token_logps, torch.Tensor) or per_token_logps.dim() != 2:
        raise ValueError("per_token_logps must be a [batch, completion_length] tensor, got "
                         f"{getattr(per_token_logps, 'shape', type(per_token_logps).__name__)}")
    batch = per_token_logps.shape[0]
    _same_shape(per_token_logps, "per_token_logps", completion_mask, "completion_mask")
    if old is not None:
        _same_shape(per_token_logps, "per_token_logps", old, "old_per_token_logps")
    if s.beta != 0.0:
        if ref is None:
            raise ValueError(f"ref_per_token_logps is required when beta={s.beta} (the KL penalty needs it)")
        _same_shape(per_token_logps, "per_token_logps", ref, "ref_per_token_logps")
    if not isinstance(advantages, torch.Tensor) or advantages.shape not in (
            (batch,), (batch, 1), tuple(per_token_logps.shape)):
        raise ValueError(f"advantages has shape {tuple(getattr(advantages, 'shape', ()))}, expected ({batch},) "
                         f"or {tuple(per_token_logps.shape)}")
    if importance_weights is not None and (not isinstance(importance_weights, torch.Tensor) or
                                           importance_weights.shape not in ((batch, 1),
                                                                            tuple(per_token_logps.shape))):
        raise ValueError(f"importance_weights has shape {tuple(getattr(importance_weights, 'shape', ()))}, "
                         f"expected ({batch}, 1) or {tuple(per_token_logps.shape)}")
    if sampling is not None:
        _same_shape(per_token_logps, "per_token_logps", sampling, "sampling_per_token_logps")
    if s.top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError(f"entropies is required when top_entropy_quantile={s.top_entropy_quantile} < 1")
    if entropies is not None:
        _same_shape(per_token_logps, "per_token_logps", entropies, "entropies")
    if s.mask_truncated_completions:
        if truncated is None:
            raise ValueError("truncated is required when mask_truncated_completions=True")
        if not isinstance(truncated, torch.Tensor) or truncated.shape != (batch,):
            raise ValueError(f"truncated has shape {tuple(getattr(truncated, 'shape', ()))}, expected ({batch},)")

"""rlcore's loss, advantages and importance-sampling correction against TRL 1.16's own code.

TRL is driven for real: a ``GRPOTrainer`` built with ``__new__`` gets the attributes its methods read, its
rollout (``_generate``), reward calls (``_calculate_rewards``) and model forward
(``_get_per_token_logps_and_entropies``) are replaced by fixed tensors, and then TRL's
``_generate_and_score_completions`` (advantages, old log-probs, the vLLM importance-sampling ratio) and
``_compute_loss`` run unmodified. rlcore computes the same quantities from the same fixed tensors with its own
functions. Loss and gradient w.r.t. the policy log-probs must agree to 1e-6 (absolute), in float64.
"""

from __future__ import annotations

import collections
import itertools
import types
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOTrainer as TRLTrainer  # noqa: E402
from trl import GRPOConfig as TRLConfig  # noqa: E402

from rlcore.advantages import group_advantages, weighted_rewards  # noqa: E402
from rlcore.config import GRPOConfig  # noqa: E402
from rlcore.loss import LossSettings, grpo_loss, importance_sampling_correction  # noqa: E402

ATOL = 1e-6  # absolute, on the loss and on every gradient entry (float64 throughout)

B, T, G = 6, 7, 3  # completions, completion width, num_generations (two groups)
LENGTHS = [7, 3, 5, 1, 7, 4]
TRUNCATED = [True, False, False, False, True, False]  # rows that hit max_completion_length = T
EOS, PAD = 2, 0
IS_CLIP_MIN, IS_CLIP_MAX = 0.7, 1.5  # tight enough that every IS mode clamps or masks something here


def test_trl_version():
    assert trl.__version__ == "1.16.0", f"these equality tests pin TRL 1.16.0, found {trl.__version__}"


def _fixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    current = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = current + 0.45 * torch.randn(B, T, generator=g, dtype=torch.float64)  # num_iterations = 2: stale
    ref = current + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling_noise = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # float32-representable so TRL's float32 entropy quantile sees the same values
    entropies = (torch.rand(B, T, generator=g) * 2).double()
    rewards = torch.randn(B, 2, generator=g, dtype=torch.float64)
    rewards[1, 1] = float("nan")  # one reward did not apply to one completion
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
    return {"current": current, "old": old, "ref": ref, "sampling_noise": sampling_noise,
            "entropies": entropies, "rewards": rewards, "mask": mask,
            "truncated": torch.tensor(TRUNCATED)}


DATA = _fixed_tensors()
REWARD_WEIGHTS = [1.0, 0.5]


def _completion_ids() -> list[list[int]]:
    out = []
    for length, truncated in zip(LENGTHS, TRUNCATED):
        ids = [5 + j for j in range(length)]
        if not truncated:
            ids[-1] = EOS
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------------ TRL side
def _bare_trl_trainer(config, *, use_vllm_is: bool, num_iterations: int, policy_logps, old_logps, rewards,
                      sampling_logps, gradient_accumulation_steps: int = 1):
    """A TRL GRPOTrainer without model or data: only the attributes its rollout/loss code reads."""
    from accelerate import Accelerator

    trainer = TRLTrainer.__new__(TRLTrainer)
    trainer.args = config
    trainer.accelerator = Accelerator(cpu=True)
    trainer.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer.ref_model = object()
    trainer.environment_factories = None
    trainer.tools = None
    trainer.environments = None
    trainer._tokenizer = types.SimpleNamespace(pad_token_id=PAD)
    trainer.pad_to_multiple_of = None
    trainer.eos_token_ids = [EOS]
    trainer.use_vllm = use_vllm_is
    trainer.num_generations = G
    trainer.num_iterations = num_iterations
    trainer.epsilon_low = config.epsilon
    trainer.epsilon_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
    for name in ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "scale_rewards",
                 "multi_objective_aggregation", "beta", "loss_type", "importance_sampling_level",
                 "off_policy_mask_threshold", "mask_truncated_completions", "top_entropy_quantile",
                 "max_completion_length"):
        setattr(trainer, name, getattr(config, name))
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer.current_gradient_accumulation_steps = gradient_accumulation_steps
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._logs = {"prompt": collections.deque(), "completion": collections.deque(),
                     "rewards": collections.defaultdict(collections.deque), "advantages": collections.deque(),
                     "extra": collections.defaultdict(collections.deque), "images": collections.deque()}
    trainer._pending_extra_logs, trainer._pending_metrics = {}, {}
    trainer.reward_weights = torch.tensor(REWARD_WEIGHTS, dtype=torch.float64)
    trainer.reward_func_names = ["r0", "r1"]
    trainer.log_multimodal = False

    completion_ids = _completion_ids()
    # TRL's non-vLLM generation returns no sampling log-probs
    sampled = [sampling_logps[i, :n].tolist() for i, n in enumerate(LENGTHS)] if use_vllm_is else None
    # the rollout engine and the reward functions: fixed outputs
    trainer._generate = lambda prompts: ([[1, 1]] * B, completion_ids, None, ["text"] * B, sampled, {}, None,
                                         [None] * B)
    trainer._calculate_rewards = lambda inputs, prompts, completions, ids: rewards.clone()
    state = {"phase": "rollout"}

    def forward(model, input_ids, attention_mask, logits_to_keep, **_):  # the model forward: fixed log-probs
        assert logits_to_keep == T
        if state["phase"] == "rollout":
            source = DATA["ref"] if model is trainer.ref_model else old_logps
            return source.clone(), None, None
        return policy_logps, DATA["entropies"].clone(), None

    trainer._get_per_token_logps_and_entropies = forward
    return trainer, state


def trl_run(kwargs: dict, *, use_vllm_is: bool, num_iterations: int, gradient_accumulation_steps: int = 1,
            rewards: torch.Tensor | None = None):
    """TRL's rollout processing then TRL's loss; returns (loss, d loss / d policy logps, rollout inputs, metrics)."""
    config = TRLConfig(output_dir="/tmp/rlcore-trl-test", report_to=[], use_cpu=True,
                       max_completion_length=T, num_generations=G, per_device_train_batch_size=B,
                       num_iterations=num_iterations, gradient_accumulation_steps=gradient_accumulation_steps,
                       **kwargs)
    policy = DATA["current"].clone().requires_grad_(True)
    old = DATA["old"] if num_iterations > 1 else DATA["current"]
    trainer, state = _bare_trl_trainer(
        config, use_vllm_is=use_vllm_is, num_iterations=num_iterations, policy_logps=policy, old_logps=old,
        rewards=DATA["rewards"] if rewards is None else rewards, sampling_logps=old + DATA["sampling_noise"],
        gradient_accumulation_steps=gradient_accumulation_steps)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TRL builds the sampling log-prob tensor from Python floats
    try:
        inputs = trainer._generate_and_score_completions([{"prompt": "p"}] * B)
    finally:
        torch.set_default_dtype(default_dtype)
    state["phase"] = "loss"
    loss = trainer._compute_loss(None, inputs)
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grad, inputs, metrics


# ------------------------------------------------------------------------------------------------ rlcore side
def ours_run(kwargs: dict, *, use_vllm_is: bool, num_iterations: int, gradient_accumulation_steps: int = 1):
    config = GRPOConfig(max_completion_length=T, num_generations=G, per_device_train_batch_size=B,
                        num_iterations=num_iterations, gradient_accumulation_steps=gradient_accumulation_steps,
                        steps_per_generation=gradient_accumulation_steps, reward_weights=REWARD_WEIGHTS,
                        vllm_importance_sampling_correction=use_vllm_is, **kwargs)
    settings = LossSettings.from_config(config)
    mask, truncated = DATA["mask"], DATA["truncated"]
    advantages, _ = group_advantages(weighted_rewards(DATA["rewards"], config.reward_weights), G,
                                     config.scale_rewards)
    old = DATA["old"] if num_iterations > 1 else None
    sampling = None
    weights = None
    if use_vllm_is:
        old_at_rollout = DATA["old"] if num_iterations > 1 else DATA["current"]
        sampling = old_at_rollout + DATA["sampling_noise"]
        weights, _ = importance_sampling_correction(
            old_at_rollout, sampling, mask, mode=config.vllm_importance_sampling_mode,
            clip_min=config.vllm_importance_sampling_clip_min, clip_max=config.vllm_importance_sampling_clip_max)
        if old is None:
            old = old_at_rollout  # scored at rollout time for the correction, as TRL does
    active = mask * (~truncated).long().unsqueeze(1) if config.mask_truncated_completions else mask
    policy = DATA["current"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(policy, old, DATA["ref"], advantages, mask, settings=settings,
                              importance_weights=weights, sampling_per_token_logps=sampling,
                              entropies=DATA["entropies"], truncated=truncated,
                              num_items_in_batch=int(active.sum()),
                              gradient_accumulation_steps=gradient_accumulation_steps)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad, metrics


def _assert_same(kwargs, *, use_vllm_is, num_iterations, gradient_accumulation_steps=1, compare_metrics=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss, trl_grad, _, trl_metrics = trl_run(kwargs, use_vllm_is=use_vllm_is,
                                                     num_iterations=num_iterations,
                                                     gradient_accumulation_steps=gradient_accumulation_steps)
        our_loss, our_grad, our_metrics = ours_run(kwargs, use_vllm_is=use_vllm_is, num_iterations=num_iterations,
                                                   gradient_accumulation_steps=gradient_accumulation_steps)
    assert torch.isfinite(our_loss)
    torch.testing.assert_close(our_loss, trl_loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=ATOL)
    assert our_grad.abs().sum() > 0, "degenerate case: zero gradient proves nothing"
    if compare_metrics:
        pairs = {"kl": "kl", "clip_ratio_low": "clip_ratio/low_mean", "clip_ratio_high": "clip_ratio/high_mean",
                 "clip_ratio_region": "clip_ratio/region_mean", "cispo_clip_ratio": "cispo_clip_ratio",
                 "entropy": "entropy"}
        for ours, theirs in pairs.items():
            if theirs in trl_metrics:
                assert ours in our_metrics, ours
                assert float(our_metrics[ours]) == pytest.approx(trl_metrics[theirs], abs=ATOL), ours
    return our_loss, our_grad


# ------------------------------------------------------------------------------------------------ the grid
LEVELS = {"dapo": ("token", "sequence"), "grpo": ("token", "sequence"), "dr_grpo": ("token", "sequence"),
          "bnpo": ("token", "sequence"), "cispo": ("token", "sequence"), "sapo": ("token", "sequence"),
          "luspo": ("sequence",)}
IS_SETTINGS = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
GRID = [(loss_type, level, beta, delta, is_mode, iterations)
        for loss_type, levels in LEVELS.items() for level in levels
        for beta, delta, is_mode, iterations in itertools.product((0.0, 0.04), (None, 2.0), IS_SETTINGS, (1, 2))]


def _kwargs(loss_type, level, beta, delta, is_mode, **extra):
    kwargs = {"loss_type": loss_type, "importance_sampling_level": level, "beta": beta, "delta": delta,
              "epsilon": 0.2, "epsilon_high": 5.0 if loss_type == "cispo" else 0.28, **extra}
    if is_mode is not None:
        kwargs.update(vllm_importance_sampling_mode=is_mode, vllm_importance_sampling_clip_min=IS_CLIP_MIN,
                      vllm_importance_sampling_clip_max=IS_CLIP_MAX)
    return kwargs


@pytest.mark.parametrize("loss_type,level,beta,delta,is_mode,iterations", GRID,
                         ids=["-".join(str(p) for p in case) for case in GRID])
def test_loss_and_gradient_equal_trl(loss_type, level, beta, delta, is_mode, iterations):
    _assert_same(_kwargs(loss_type, level, beta, delta, is_mode), use_vllm_is=is_mode is not None,
                 num_iterations=iterations)


# ------------------------------------------------------------------------------------------------ the options
OPTION_CASES = {
    "off_policy_mask_with_engine_logps": ({"off_policy_mask_threshold": 0.05}, True),
    "off_policy_mask_without_engine_logps": ({"off_policy_mask_threshold": 0.05}, False),
    "top_entropy_quantile": ({"top_entropy_quantile": 0.6}, False),
    "top_entropy_quantile_zero": ({"top_entropy_quantile": 0.0}, False),
    "mask_truncated_completions": ({"mask_truncated_completions": True}, True),
    "all_options": ({"mask_truncated_completions": True, "top_entropy_quantile": 0.5,
                     "off_policy_mask_threshold": 0.05}, True),
    "scale_rewards_batch": ({"scale_rewards": "batch"}, False),
    "scale_rewards_none": ({"scale_rewards": "none"}, False),
    "no_bias_correction_kl": ({"use_bias_correction_kl": False}, False),
    "default_is_clip": ({"vllm_importance_sampling_clip_min": None, "vllm_importance_sampling_clip_max": 3.0}, True),
}


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token"), ("luspo", "sequence"), ("bnpo", "token"),
                                             ("dr_grpo", "sequence")])
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_equal_trl(case, loss_type, level):
    extra, use_is = OPTION_CASES[case]
    kwargs = _kwargs(loss_type, level, 0.04, None, "token_truncate" if use_is else None, **extra)
    kwargs.update(extra)
    _assert_same(kwargs, use_vllm_is=use_is, num_iterations=2)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "token"), ("dr_grpo", "token"),
                                             ("bnpo", "token"), ("cispo", "token"), ("sapo", "token"),
                                             ("luspo", "sequence")])
def test_gradient_accumulation_equal_trl(loss_type, level):
    # TRL rescales dapo/cispo's num_items_in_batch by gradient_accumulation_steps / steps_per_generation and
    # divides the others by gradient_accumulation_steps; steps_per_generation defaults to it (2) on both sides
    kwargs = _kwargs(loss_type, level, 0.04, 2.0, None)
    _assert_same(kwargs, use_vllm_is=False, num_iterations=2, gradient_accumulation_steps=2)


def test_all_truncated_equal_trl_and_finite():
    global TRUNCATED
    saved = TRUNCATED
    TRUNCATED = [True] * B
    DATA["truncated"] = torch.tensor(TRUNCATED)
    try:
        for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("luspo", "sequence"),
                                 ("bnpo", "token"), ("dr_grpo", "token")):
            kwargs = _kwargs(loss_type, level, 0.04, None, "sequence_mask", mask_truncated_completions=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trl_loss, trl_grad, _, _ = trl_run(kwargs, use_vllm_is=True, num_iterations=2)
                our_loss, our_grad, metrics = ours_run(kwargs, use_vllm_is=True, num_iterations=2)
            assert float(our_loss) == 0.0 and float(our_grad.abs().sum()) == 0.0
            torch.testing.assert_close(our_loss, trl_loss, rtol=0, atol=ATOL)
            torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=ATOL)
            assert all(torch.isfinite(v) for v in metrics.values())
    finally:
        TRUNCATED = saved
        DATA["truncated"] = torch.tensor(saved)


# ------------------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("mode", IS_SETTINGS[1:])
@pytest.mark.parametrize("iterations", [1, 2])
def test_importance_sampling_weights_equal_trl(mode, iterations):
    kwargs = _kwargs("dapo", "token", 0.0, None, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inputs, trl_metrics = trl_run(kwargs, use_vllm_is=True, num_iterations=iterations)
    old = DATA["old"] if iterations > 1 else DATA["current"]
    weights, metrics = importance_sampling_correction(old, old + DATA["sampling_noise"], DATA["mask"], mode=mode,
                                                      clip_min=IS_CLIP_MIN, clip_max=IS_CLIP_MAX)
    expected = inputs["importance_sampling_ratio"]
    assert weights.shape == expected.shape
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    for ours, theirs in (("min", "min"), ("mean", "mean"), ("max", "max")):
        assert float(metrics[ours]) == pytest.approx(trl_metrics[f"sampling/importance_sampling_ratio/{theirs}"],
                                                     abs=1e-9)
    assert float(metrics["logp_diff_mean"]) == pytest.approx(
        trl_metrics["sampling/sampling_logp_difference/mean"], abs=1e-9)
    assert float(metrics["logp_diff_max"]) == pytest.approx(
        trl_metrics["sampling/sampling_logp_difference/max"], abs=1e-9)
    # the fixture must exercise the clip: some weight clamped or zeroed
    assert 0 < float(metrics["fraction_corrected"]) < 1


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards):
    rewards = DATA["rewards"].clone()
    rewards[3:, 0] = 1.0  # second group: first reward constant
    rewards[4] = float("nan")  # unscorable completion: every reward returned None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, inputs, trl_metrics = trl_run({"scale_rewards": scale_rewards}, use_vllm_is=False, num_iterations=1,
                                            rewards=rewards)
    advantages, stats = group_advantages(weighted_rewards(rewards, REWARD_WEIGHTS), G, scale_rewards)
    torch.testing.assert_close(advantages, inputs["advantages"], rtol=0, atol=1e-12)
    assert stats["frac_reward_zero_std"] == pytest.approx(trl_metrics["frac_reward_zero_std"])
    assert float(advantages[4]) == 0.0


def test_fixture_exercises_every_branch():
    """Guards the grid's power: clipping, the delta cap and both advantage signs must occur in the data."""
    advantages, _ = group_advantages(weighted_rewards(DATA["rewards"], REWARD_WEIGHTS), G, "group")
    mask = DATA["mask"].bool()
    ratio = torch.exp(DATA["current"] - DATA["old"])
    a = advantages.unsqueeze(1).expand(B, T)
    assert ((ratio > 1.28) & (a > 0) & mask).any(), "no high-clipped token"
    assert ((ratio < 0.8) & (a < 0) & mask).any(), "no low-clipped token"
    assert ((ratio > 2.0) & (a < 0) & mask).any(), "delta=2 never binds"
    sequence_ratio = torch.exp(((DATA["current"] - DATA["old"]) * mask).sum(1) / mask.sum(1))
    assert ((sequence_ratio > 1.28) | (sequence_ratio < 0.8)).any(), "no sequence-level clipping"

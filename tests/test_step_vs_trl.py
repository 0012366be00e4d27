"""Whole GRPO steps of rlcore against TRL 1.16's ``GRPOTrainer`` + PEFT, on the same model and completions.

``tests/test_loss_trl.py`` proves the loss formulas equal TRL's on fixed tensors. This file checks everything
around them on a real model: prompt encoding with the chat template, the completion layout (the stop token kept,
a completion cut at ``max_completion_length`` without one, one that is only the stop token), left/right padding,
attention masks and positions, rlcore's per-micro-batch trimming, PEFT LoRA, the log-prob head (and rlcore's
kernels' autograd functions), gradient checkpointing, advantages, the engine-mismatch importance weights, loss
normalisation across micro-batches, gradient clipping, and the AdamW update with its learning-rate schedule.

Both frameworks get the tiny Llama-3 model (:mod:`rlcore.tiny_model`) in float32 with LoRA r=8, alpha=16,
dropout 0 on all seven projections and identical adapter weights (B non-zero, so that A has a gradient too); the
same three chat prompts (dataset order) and the same twelve completions with fixed rewards that vary within two
groups and tie in the third. Only generation is replaced: rlcore gets an engine returning these rollouts, TRL's
``_generate_single_turn`` returns them. Where the sampling log-probs and the vLLM importance-sampling correction
are under test, TRL's ``use_vllm`` is switched on after construction, so that TRL reads them as it reads vLLM's;
elsewhere both frameworks run with the correction off (TRL without vLLM has none). The sampling log-probs are an
independent per-sequence forward of the same adapted model (no padding) plus seeded noise that puts one completion
above and one below the correction's bounds. Each framework then runs its own real step code (rlcore
``GRPOTrainer.training_step``, TRL ``Trainer.train``) for two optimizer steps, both generations served the same
completions.

Compared at each step (float32; tolerances below): the prompt ids each framework encoded (exactly); each
completion's per-token log-probs in the training forward (against each other, and at step 1 against the
independent unpadded forward); advantages; importance-sampling weights; the loss (sum over micro-steps); the
pre-clip gradient norm; every LoRA parameter's gradient as the optimizer receives it (after clipping). After the
second update: every LoRA parameter.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from rlcore.config import GRPOConfig, ModelConfig
from rlcore.rollout import Rollout, RolloutEngine, SamplingSettings
from rlcore.tiny_model import EOT, build_tiny_model
from rlcore.trainer import GRPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames checkpointing options


@dataclasses.dataclass(frozen=True)
class Tolerances:
    logp: float  # per token, absolute (the frameworks number RoPE positions differently: equal up to rounding)
    value: float  # advantages, IS weights, loss, gradient norm: |a − b| ≤ value · max(|b|, VALUE_SCALE)
    grad: float  # ‖g_rlcore − g_trl‖ / ‖g_trl‖ over all LoRA parameters together
    grad_param: float  # the same per parameter tensor
    weight: float  # ‖Δθ_rlcore − Δθ_trl‖ / ‖Δθ_trl‖ after the updates (AdamW: elements with |g| ≈ eps may flip)


VALUE_SCALE = 1e-2  # an on-policy grpo loss is ~0 (advantages sum to 0 per group): compared absolutely
# Measured on a 2-core CPU: log-probs agree to 2e-6, losses / norms to 1e-5 relative, gradients to 1.1e-6 (1e-5 per
# tensor), the adapters after two updates to 1.2e-4.
CPU_FLOAT32 = Tolerances(logp=2e-5, value=1e-4, grad=1e-4, grad_param=1e-3, weight=1e-3)
# CUDA float32: rlcore's Triton kernels against PyTorch's ops and TRL's fused head (not measured here)
CUDA_FLOAT32 = Tolerances(logp=1e-3, value=1e-3, grad=1e-3, grad_param=1e-2, weight=5e-2)

STEPS = 2
NUM_GENERATIONS = 4
MAX_COMPLETION = 8
LEARNING_RATE = 1e-3
LORA_R, LORA_ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "A farmer has 7 cows and buys 5 more. How many cows does the farmer have now?"}],
    [{"role": "user", "content": "Name a colour."}],
]
# (length, finish reason) of each completion, group by group: "stop" ends with <|eot_id|>, "length" was cut at
# MAX_COMPLETION without one. A "stop" of length MAX_COMPLETION ended on the last token it was allowed.
SHAPES = [
    [(3, "stop"), (MAX_COMPLETION, "length"), (1, "stop"), (6, "stop")],
    [(5, "stop"), (2, "stop"), (MAX_COMPLETION, "length"), (4, "stop")],
    [(7, "stop"), (3, "stop"), (5, "stop"), (MAX_COMPLETION, "stop")],
]
REWARDS = [[1.0, 0.0, 0.5, 0.25], [0.0, 0.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3]]  # the last group ties: advantage 0
# the sampling log-probs of completion (group, index) are moved by these nats in total, so that the sequence
# ratio exp(Σ old − samp) lands above IS_CLIP_MAX resp. below IS_CLIP_MIN
IS_CLIP_MIN, IS_CLIP_MAX = 0.5, 3.0
SAMPLING_SHIFTS = {(0, 0): -1.5, (1, 3): 1.0}


@dataclasses.dataclass(frozen=True)
class Case:
    loss_type: str
    micro_batch: int  # per_device_train_batch_size; gradient_accumulation_steps = 12 / micro_batch
    is_mode: str | None = None  # vllm_importance_sampling_mode; None: the correction off on both sides
    kernels: bool = False  # rlcore.kernels.apply_kernels on rlcore's model (their CPU path; CUDA's on a GPU)
    checkpointing: bool = False  # gradient checkpointing (non-reentrant) on both sides
    padding_free: bool = False  # rlcore packs each micro-batch into one row (TRL pads)
    mask_truncated: bool = False
    temperature: float = 1.0
    max_grad_norm: float = 1.0

    @property
    def accumulation(self) -> int:
        return len(PROMPTS) * NUM_GENERATIONS // self.micro_batch

    @property
    def name(self) -> str:
        flags = {"kernels": self.kernels, "checkpointing": self.checkpointing, "padding-free": self.padding_free,
                 "mask-truncated": self.mask_truncated}
        parts = [self.loss_type, f"{self.micro_batch}x{self.accumulation}", self.is_mode or "no-is"]
        parts += [flag for flag, on in flags.items() if on]
        parts += [f"T{self.temperature}"] if self.temperature != 1.0 else []
        parts += [f"clip{self.max_grad_norm}"] if self.max_grad_norm != 1.0 else []
        return "-".join(parts)


CASES = [
    Case("dapo", 12, "sequence_mask"),  # the arithmetic example's setting (one micro-batch per step)
    Case("dapo", 4, "sequence_mask", checkpointing=True),
    Case("dapo", 6, None, kernels=True),
    Case("grpo", 12, None),
    Case("grpo", 4, "token_truncate", kernels=True, checkpointing=True),
    Case("bnpo", 6, "sequence_mask"),
    Case("dapo", 6, "sequence_mask", padding_free=True),
    Case("dr_grpo", 4, None),
    # clipping that binds, truncated completions masked, a temperature the log-probs must divide by
    Case("dapo", 4, "sequence_mask", mask_truncated=True, temperature=0.7, max_grad_norm=0.05),
]


# ---------------------------------------------------------------------------------------------- the fixed batch
@dataclasses.dataclass
class Completion:
    ids: list[int]
    finish_reason: str
    reward: float
    sampling_logps: dict[float, list[float]]  # temperature → what the engine reports for each sampled token


@dataclasses.dataclass
class Scenario:
    path: str
    prompt_ids: list[list[int]]  # one per prompt, encoded by this test
    completions: list[list[Completion]]  # [prompt][generation]
    lora: dict[str, torch.Tensor]  # adapter parameter name → initial value, for both frameworks
    reference_logps: dict[tuple[float, tuple[int, ...]], list[float]]  # (T, completion) → the unpadded forward

    def by_completion(self) -> dict[tuple[int, ...], Completion]:
        return {tuple(c.ids): c for group in self.completions for c in group}


def _lora_config() -> LoraConfig:
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="CAUSAL_LM")


def _load(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def _unpadded_logps(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each completion token: one sequence, no padding, positions 0 … L−1."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    targets = ids[0, len(prompt):]
    logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logps.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    path = build_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    special = set(tokenizer.all_special_ids) | {eot}
    regular = [i for i in range(len(tokenizer))
               if i not in special and not tokenizer.convert_ids_to_tokens(i).startswith("<|")]
    generator = torch.Generator().manual_seed(2024)
    prompt_ids = []
    for messages in PROMPTS:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt_ids.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
        assert prompt_ids[-1].count(tokenizer.bos_token_id) == 1 and prompt_ids[-1][0] == tokenizer.bos_token_id

    # the adapter both frameworks start from: A as PEFT draws it, B random instead of PEFT's zeros
    torch.manual_seed(7)
    reference = get_peft_model(_load(path), _lora_config())
    lora = {}
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            if ".lora_B." in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
            lora[name] = parameter.detach().clone()
    reference.eval()

    completions, reference_logps = [], {}
    for group, (prompt, shapes, rewards) in enumerate(zip(prompt_ids, SHAPES, REWARDS, strict=True)):
        row = []
        for index, ((length, finish), reward) in enumerate(zip(shapes, rewards, strict=True)):
            body = length - 1 if finish == "stop" else length
            ids = [regular[i] for i in torch.randint(len(regular), (body,), generator=generator).tolist()]
            ids += [eot] if finish == "stop" else []
            sampling = {}
            for temperature in sorted({case.temperature for case in CASES}):
                exact = _unpadded_logps(reference, prompt, ids, temperature)
                reference_logps[(temperature, tuple(ids))] = exact
                noise = (torch.randn(len(ids), generator=generator, dtype=torch.float64) * 0.02).tolist()
                shift = SAMPLING_SHIFTS.get((group, index), 0.0) / len(ids)
                sampling[temperature] = [e + n + shift for e, n in zip(exact, noise, strict=True)]
            row.append(Completion(ids, finish, reward, sampling))
        completions.append(row)
    assert len({tuple(c.ids) for group in completions for c in group}) == len(PROMPTS) * NUM_GENERATIONS
    return Scenario(path, prompt_ids, completions, lora, reference_logps)


def fixed_reward(prompts, completions, completion_ids, **kwargs):
    """The scenario's reward of each completion, looked up by its token ids (both frameworks pass them)."""
    return [fixed_reward.table[tuple(ids)] for ids in completion_ids]


def _rows() -> list[dict]:
    return [{"prompt": messages} for messages in PROMPTS]


class _Server:
    """Hands out each prompt's completions in order (the same ones to every generation); records the prompts."""

    def __init__(self, scenario: Scenario, temperature: float) -> None:
        self.table = {tuple(p): group for p, group in zip(scenario.prompt_ids, scenario.completions, strict=True)}
        self.temperature = temperature
        self.served: collections.Counter = collections.Counter()
        self.asked: list[list[int]] = []

    def next(self, prompt: list[int]) -> Completion:
        key = tuple(prompt)
        self.asked.append(list(prompt))
        assert key in self.table, f"a framework encoded a chat prompt differently from the tokenizer: {prompt}"
        completion = self.table[key][self.served[key] % NUM_GENERATIONS]
        self.served[key] += 1
        return completion


class FixedEngine(RolloutEngine):
    """rlcore's side: the scenario's rollouts instead of sampling."""

    name = "fixed"

    def __init__(self, server: _Server, tokenizer) -> None:
        self.server, self.tokenizer = server, tokenizer

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Rollout]:
        assert sampling.max_tokens == MAX_COMPLETION and sampling.temperature == self.server.temperature
        rollouts = []
        for prompt in prompt_ids:
            completion = self.server.next(prompt)
            rollouts.append(Rollout(prompt_ids=list(prompt), completion_ids=list(completion.ids),
                                    text=self.tokenizer.decode(completion.ids, skip_special_tokens=True),
                                    logprobs=list(completion.sampling_logps[self.server.temperature]),
                                    finish_reason=completion.finish_reason))
        return rollouts


# ---------------------------------------------------------------------------------------------- each framework
@dataclasses.dataclass
class StepRecord:
    logps: dict[tuple[int, ...], list[float]] = dataclasses.field(default_factory=dict)  # training forward
    advantages: dict[tuple[int, ...], float] = dataclasses.field(default_factory=dict)
    is_weights: dict[tuple[int, ...], list[float]] = dataclasses.field(default_factory=dict)  # per token
    loss: float = 0.0  # the optimizer step's: the sum of its micro-steps' (each scaled for accumulation)
    grad_norm: float = float("nan")  # before clipping
    grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # as the optimizer gets them


@dataclasses.dataclass
class RunRecord:
    prompt_ids: list[list[int]]  # what the framework asked the engine for, in order
    steps: list[StepRecord]
    weights: dict[str, torch.Tensor]  # the adapter after the last update


def _set_lora(model, lora: dict[str, torch.Tensor]) -> None:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(lora), "the frameworks' adapters have different parameters"
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(lora[name])


def _lora_values(model, attribute: str) -> dict[str, torch.Tensor]:
    return {n: getattr(p, attribute).detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def run_rlcore(scenario: Scenario, case: Case, output_dir: str, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> RunRecord:
    tokenizer = AutoTokenizer.from_pretrained(scenario.path)
    server = _Server(scenario, case.temperature)
    args = GRPOConfig(
        output_dir=output_dir, learning_rate=LEARNING_RATE, max_steps=STEPS, num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=case.micro_batch, gradient_accumulation_steps=case.accumulation,
        max_prompt_length=None, max_completion_length=MAX_COMPLETION, temperature=case.temperature,
        loss_type=case.loss_type, beta=0.0, epsilon=0.2, num_iterations=1, scale_rewards="group",
        mask_truncated_completions=case.mask_truncated, max_grad_norm=case.max_grad_norm, shuffle_dataset=False,
        gradient_checkpointing=case.checkpointing, padding_free=case.padding_free,
        vllm_importance_sampling_correction=case.is_mode is not None,
        vllm_importance_sampling_mode=case.is_mode or "sequence_mask",
        vllm_importance_sampling_clip_min=IS_CLIP_MIN, vllm_importance_sampling_clip_max=IS_CLIP_MAX,
        logprob_chunk_size=16,  # several lm_head chunks per micro-batch, as at real sizes
        report_to="none", seed=0)
    model_config = ModelConfig(dtype=str(dtype).removeprefix("torch."), engine="hf", lora_r=LORA_R,
                               lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                               kernels=case.kernels)
    trainer = GRPOTrainer(_load(scenario.path, dtype).to(device), processing_class=tokenizer,
                          reward_funcs=[fixed_reward], args=args, train_dataset=_rows(), model_config=model_config,
                          engine=FixedEngine(server, tokenizer), show_progress=False)
    _set_lora(trainer.model, scenario.lora)
    if case.kernels and device == "cpu":  # on CUDA the trainer applies them itself
        from rlcore.kernels import apply_kernels

        counts = apply_kernels(trainer.model, lora=True)
        assert counts["lora"] == 2 * len(TARGETS) and counts["rope"] == 2, counts

    steps = [StepRecord() for _ in range(STEPS)]

    def record_gradients(optimizer, args, kwargs):  # after clipping, right before the update
        steps[trainer.step].grads = _lora_values(trainer.model, "grad")

    trainer.optimizer.register_step_pre_hook(record_gradients)
    trainer.model.train()  # as GRPOTrainer.train does before its loop
    for step, record in enumerate(steps):
        metrics = trainer.training_step(step)
        trainer.step += 1
        record.loss, record.grad_norm = metrics["loss"], metrics["grad_norm"]
        batch = trainer.buffers[step]  # one optimizer step per generation
        lengths = batch.completion_mask.sum(1).tolist()
        for row in range(batch.size):
            key = tuple(batch.completion_ids[row, :lengths[row]].tolist())
            record.logps[key] = batch.old_logps[row, :lengths[row]].tolist()  # the training forward's (on-policy)
            record.advantages[key] = float(batch.advantages[row])
            if batch.is_weights is not None:
                record.is_weights[key] = batch.is_weights[row, :lengths[row]].tolist()
    return RunRecord(server.asked, steps, _lora_values(trainer.model, "data"))


class _OptimizerInput(TrainerCallback):
    """TRL's side: the gradients right before ``optimizer.step()`` (transformers clips before this event)."""

    def __init__(self, steps: list[StepRecord]) -> None:
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step].grads = _lora_values(model, "grad")


def run_trl(scenario: Scenario, case: Case, output_dir: str, monkeypatch, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> RunRecord:
    from trl.trainer import grpo_trainer

    tokenizer = AutoTokenizer.from_pretrained(scenario.path)
    server = _Server(scenario, case.temperature)
    args = trl.GRPOConfig(
        output_dir=output_dir, learning_rate=LEARNING_RATE, max_steps=STEPS, num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=case.micro_batch, gradient_accumulation_steps=case.accumulation,
        max_completion_length=MAX_COMPLETION, temperature=case.temperature, loss_type=case.loss_type, beta=0.0,
        epsilon=0.2, num_iterations=1, scale_rewards="group", mask_truncated_completions=case.mask_truncated,
        max_grad_norm=case.max_grad_norm, shuffle_dataset=False, gradient_checkpointing=case.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        vllm_importance_sampling_correction=case.is_mode is not None,
        vllm_importance_sampling_mode=case.is_mode or "sequence_mask",
        vllm_importance_sampling_clip_min=IS_CLIP_MIN, vllm_importance_sampling_clip_max=IS_CLIP_MAX,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False, seed=0)
    steps = [StepRecord() for _ in range(STEPS)]
    trainer = trl.GRPOTrainer(model=_load(scenario.path, dtype), reward_funcs=[fixed_reward], args=args,
                              train_dataset=datasets.Dataset.from_list(_rows()), processing_class=tokenizer,
                              peft_config=_lora_config(), callbacks=[_OptimizerInput(steps)])
    _set_lora(trainer.model, scenario.lora)
    if case.is_mode is not None:
        trainer.use_vllm = True  # TRL then reads the sampling log-probs and corrects for them, as with vLLM
    if case.loss_type == "bnpo":
        # TRL shuffles a generation's completions before cutting it into micro-batches, rlcore keeps their order
        # (whole groups per micro-batch); only bnpo (normalised per micro-batch) can tell, so TRL keeps the order
        monkeypatch.setattr(grpo_trainer, "shuffle_sequence_dict", lambda batch: batch)

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        served = [server.next(list(prompt)) for prompt in prompt_ids]
        logprobs = [list(c.sampling_logps[case.temperature]) for c in served] if trainer.use_vllm else None
        return [list(c.ids) for c in served], logprobs

    def record_forward(model, input_ids, attention_mask, logits_to_keep, *a, **k):
        out = forward(model, input_ids, attention_mask, logits_to_keep, *a, **k)
        if torch.is_grad_enabled():  # the training forward (the no-grad one scores the old policy)
            record = steps[trainer.state.global_step]
            for row in range(input_ids.shape[0]):
                key = _which_completion(input_ids[row, -logits_to_keep:], scenario)
                record.logps[key] = out[0][row, :len(key)].tolist()
        return out

    def record_loss(model, inputs, *a, **k):
        record = steps[trainer.state.global_step]
        for row in range(inputs["completion_ids"].shape[0]):
            key = _which_completion(inputs["completion_ids"][row], scenario)
            record.advantages[key] = float(inputs["advantages"][row])
            if "importance_sampling_ratio" in inputs:
                ratio = inputs["importance_sampling_ratio"][row]
                record.is_weights[key] = ratio.expand(len(key)).tolist() if ratio.numel() == 1 \
                    else ratio[:len(key)].tolist()
        loss = compute_loss(model, inputs, *a, **k)
        record.loss += float(loss.detach())
        return loss

    trainer._generate_single_turn = generate
    forward, trainer._get_per_token_logps_and_entropies = trainer._get_per_token_logps_and_entropies, record_forward
    compute_loss, trainer.compute_loss = trainer.compute_loss, record_loss
    trainer.train()
    for record, norm in zip(steps, [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log],
                            strict=True):
        record.grad_norm = float(norm)
    return RunRecord(server.asked, steps, _lora_values(trainer.model, "data"))


def _which_completion(row: torch.Tensor, scenario: Scenario) -> tuple[int, ...]:
    """The scenario completion a right-padded TRL row holds: the longest one it starts with (the pad id is
    <|eot_id|>, so a completion's own stop token and the padding after it look alike)."""
    tokens = tuple(row.tolist())
    return max((key for key in scenario.by_completion() if tokens[:len(key)] == key), key=len)


# ---------------------------------------------------------------------------------------------- comparison
def _close(ours: float, theirs: float, tolerance: float) -> bool:
    return abs(ours - theirs) <= tolerance * max(abs(theirs), VALUE_SCALE)


def _relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    names = sorted(theirs)
    a = torch.cat([ours[n].flatten() for n in names]).double()
    b = torch.cat([theirs[n].flatten() for n in names]).double()
    return float((a - b).norm() / b.norm())


def compare(ours: RunRecord, theirs: RunRecord, scenario: Scenario, case: Case,
            tolerances: Tolerances = CPU_FLOAT32) -> None:
    completions = scenario.by_completion()
    expected_prompts = [p for p in scenario.prompt_ids for _ in range(NUM_GENERATIONS)] * STEPS
    assert ours.prompt_ids == expected_prompts, "rlcore encoded the chat prompts differently"
    assert theirs.prompt_ids == expected_prompts, "TRL encoded the chat prompts differently"
    read = {key for key, c in completions.items() if not (case.mask_truncated and c.finish_reason == "length")}

    for step, (mine, reference) in enumerate(zip(ours.steps, theirs.steps, strict=True), start=1):
        where = f"step {step}"
        # 1. per-token log-probs of the training forward, on the completions the loss reads
        assert set(mine.logps) == set(reference.logps) == set(completions), \
            f"{where}: the frameworks trained on different completions (a stop token dropped or added?)"
        for key in read:
            worst = max(abs(a - b) for a, b in zip(mine.logps[key], reference.logps[key], strict=True))
            assert worst < tolerances.logp, f"{where}: log-probs of {key} differ by {worst:.2e} (rlcore vs TRL)"
            if step == 1:  # the weights the independent forward used
                exact = scenario.reference_logps[(case.temperature, key)]
                for name, values in (("rlcore", mine.logps[key]), ("TRL", reference.logps[key])):
                    worst = max(abs(a - b) for a, b in zip(values, exact, strict=True))
                    assert worst < tolerances.logp, f"{name}'s log-probs of {key}: {worst:.2e} off an unpadded forward"

        # 2. advantages and importance-sampling weights
        for key in completions:
            assert _close(mine.advantages[key], reference.advantages[key], tolerances.value), (where, key)
        assert bool(mine.is_weights) == bool(reference.is_weights) == (case.is_mode is not None), where
        if case.is_mode is not None:
            for key in read:
                pairs = zip(mine.is_weights[key], reference.is_weights[key], strict=True)
                assert all(_close(a, b, tolerances.value) for a, b in pairs), \
                    (where, key, mine.is_weights[key], reference.is_weights[key])
            if case.is_mode == "sequence_mask" and step == 1:
                masked = sum(reference.is_weights[key][0] == 0.0 for key in read)
                assert masked == len(SAMPLING_SHIFTS), "one completion is meant above, one below the IS bounds"

        # 3. the loss and the gradient the optimizer gets
        assert _close(mine.loss, reference.loss, tolerances.value), (where, mine.loss, reference.loss)
        assert _close(mine.grad_norm, reference.grad_norm, tolerances.value), \
            (where, mine.grad_norm, reference.grad_norm)
        assert sorted(mine.grads) == sorted(reference.grads) == sorted(scenario.lora), where
        total = _relative_difference(mine.grads, reference.grads)
        assert total < tolerances.grad, f"{where}: LoRA gradients differ by {total:.2e} (relative)"
        for name in sorted(reference.grads):
            size = float(reference.grads[name].double().norm())
            assert size > 0.0, f"{where}: {name} has no gradient, so the comparison would not see it"
            difference = float((mine.grads[name] - reference.grads[name]).double().norm()) / size
            assert difference < tolerances.grad_param, f"{where}: {name}'s gradient differs by {difference:.2e}"
        norm = float(torch.cat([g.flatten() for g in reference.grads.values()]).double().norm())
        clipped = reference.grad_norm > case.max_grad_norm
        assert abs(norm - (case.max_grad_norm if clipped else reference.grad_norm)) <= 1e-4 * norm, where
        if case.max_grad_norm < 1.0:
            assert clipped, f"{where}: this case is meant to clip"

    # 4. the adapter after the updates (AdamW, the linear schedule)
    moved = {n: theirs.weights[n] - scenario.lora[n] for n in scenario.lora}
    assert min(float(d.norm()) for d in moved.values()) > 0.0
    difference = _relative_difference({n: ours.weights[n] - scenario.lora[n] for n in scenario.lora}, moved)
    assert difference < tolerances.weight, f"the adapters moved differently: {difference:.2e} (relative)"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_steps_equal_trl(case, scenario, tmp_path, monkeypatch):
    fixed_reward.table = {key: c.reward for key, c in scenario.by_completion().items()}
    ours = run_rlcore(scenario, case, str(tmp_path / "rlcore"))
    theirs = run_trl(scenario, case, str(tmp_path / "trl"), monkeypatch)
    compare(ours, theirs, scenario, case)


# ---------------------------------------------------------------------------------------------- on a GPU
# The arithmetic example's step as benchmarks/learning_gpu.py runs it on an H200 (one micro-batch per step, dapo,
# the sequence-level IS mask, rlcore's Triton kernels, gradient checkpointing), and a micro-batched grpo step.
CUDA_CASES = [Case("dapo", 12, "sequence_mask", kernels=True, checkpointing=True),
              Case("grpo", 4, "token_truncate", kernels=True, checkpointing=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name)
def test_float32_steps_on_cuda_equal_trl(case, scenario, tmp_path, monkeypatch):
    fixed_reward.table = {key: c.reward for key, c in scenario.by_completion().items()}
    ours = run_rlcore(scenario, case, str(tmp_path / "rlcore"), device="cuda")
    theirs = run_trl(scenario, case, str(tmp_path / "trl"), monkeypatch, device="cuda")
    compare(ours, theirs, scenario, case, CUDA_FLOAT32)


def _errors(run: RunRecord, reference: RunRecord, scenario: Scenario, case: Case) -> dict[str, float]:
    """How far ``run`` is from ``reference`` (float32 on the CPU): the worst per-token log-prob at step 1, and the
    relative error of each step's gradient norm and gradient, and of the adapter's movement."""
    read = [key for key, c in scenario.by_completion().items()
            if not (case.mask_truncated and c.finish_reason == "length")]
    errors = {"logp step 1": max(abs(a - b) for key in read for a, b in
                                 zip(run.steps[0].logps[key], reference.steps[0].logps[key], strict=True))}
    for step, (mine, exact) in enumerate(zip(run.steps, reference.steps, strict=True), start=1):
        errors[f"grad norm step {step}"] = abs(mine.grad_norm - exact.grad_norm) / exact.grad_norm
        errors[f"grad step {step}"] = _relative_difference(mine.grads, exact.grads)
    errors["adapter movement"] = _relative_difference({n: run.weights[n] - scenario.lora[n] for n in scenario.lora},
                                                      {n: reference.weights[n] - scenario.lora[n]
                                                       for n in scenario.lora})
    return errors


BFLOAT16_TRIALS = 4  # reward orders averaged over: one draw of bf16 rounding favours either side by chance


def _permuted_rewards(trial: int) -> list[list[float]]:
    """The scenario's rewards, shuffled within each group (trial 0: as they are)."""
    generator = torch.Generator().manual_seed(trial)
    return [[group[i] for i in (torch.randperm(len(group), generator=generator).tolist() if trial else
                                range(len(group)))] for group in REWARDS]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name)
def test_bfloat16_steps_on_cuda_are_as_accurate_as_trl(case, scenario, tmp_path, monkeypatch):
    """bf16 on CUDA, as the benchmark trains: each framework's distance from the float32 CPU steps (which are equal
    across frameworks, test_steps_equal_trl), averaged over reward orders. rlcore computes its LoRA term in bf16
    with fp32 accumulation and runs its own kernels: it must not be noticeably less accurate than TRL."""
    totals: dict[str, dict[str, float]] = {"rlcore": collections.Counter(), "TRL": collections.Counter()}
    for trial in range(BFLOAT16_TRIALS):
        rewards = _permuted_rewards(trial)
        fixed_reward.table = {tuple(c.ids): rewards[g][i] for g, group in enumerate(scenario.completions)
                              for i, c in enumerate(group)}
        folder = tmp_path / str(trial)
        reference = run_rlcore(scenario, case, str(folder / "reference"))
        runs = {"rlcore": run_rlcore(scenario, case, str(folder / "rlcore"), device="cuda", dtype=torch.bfloat16),
                "TRL": run_trl(scenario, case, str(folder / "trl"), monkeypatch, device="cuda",
                               dtype=torch.bfloat16)}
        for name, run in runs.items():
            for quantity, error in _errors(run, reference, scenario, case).items():
                totals[name][quantity] += error / BFLOAT16_TRIALS
    print(f"\n{case.name}: bf16 on CUDA, mean error against float32 on the CPU over {BFLOAT16_TRIALS} reward orders")
    for quantity in totals["TRL"]:
        print(f"  {quantity:20s} rlcore {totals['rlcore'][quantity]:.2e}   TRL {totals['TRL'][quantity]:.2e}")
    for quantity, theirs in totals["TRL"].items():
        ours = totals["rlcore"][quantity]
        # AdamW's first steps move each weight by about ±lr: where a gradient is near 0, bf16 flips the sign
        assert quantity == "adapter movement" or ours < 0.2, f"rlcore's bf16 {quantity} is {ours:.2e} off float32"
        assert ours <= 2 * theirs + 0.01, f"rlcore's bf16 {quantity} is {ours:.2e} off float32, TRL's {theirs:.2e}"

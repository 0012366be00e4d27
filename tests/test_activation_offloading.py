"""activation_offloading: the training forward runs inside rlcore.kernels.offload_activations; same numbers."""

import pytest

import rlcore.trainer as trainer_module
from rlcore import GRPOConfig, ModelConfig
from rlcore.kernels import offload_activations
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardFunction

pytest.importorskip("transformers")
pytest.importorskip("peft")


class DigitShare(RewardFunction):
    def __call__(self, prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(32)]
COMPARED = ("loss", "grad_norm", "kl", "reward_mean")


def run(tmp_path, name: str, model: ModelConfig | None = None, **overrides) -> list[dict]:
    values = dict(output_dir=str(tmp_path / name), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=12, max_prompt_length=64,
                  learning_rate=1e-3, max_steps=3, save_steps=100, seed=3, logging_steps=1, beta=0.04,
                  gradient_checkpointing=True, report_to=[])
    values.update(overrides)
    model = model or ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32")
    trainer = trainer_module.GRPOTrainer(model, reward_funcs=[DigitShare()], args=GRPOConfig(**values),
                                         train_dataset=ROWS, show_progress=False)
    return read_metrics(trainer.train()["metrics_file"])


def assert_same_steps(got: list[dict], want: list[dict], rel: float, atol: float = 1e-7) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=atol), (b["step"], key)


def test_activation_offloading_wraps_the_training_forward(tmp_path, monkeypatch):
    """On CPU the real context moves nothing, so a recording subclass that round-trips CPU tensors stands in:
    it must see the tensors of every micro-step's forward (with gradient checkpointing: the layer inputs),
    and backward must get them back intact."""
    plain = run(tmp_path, "plain")
    entered = []

    class RoundTrip(offload_activations):
        def __init__(self) -> None:
            super().__init__(min_bytes=1024, force_cpu_roundtrip=True)
            entered.append(self)

    monkeypatch.setattr(trainer_module, "offload_activations", RoundTrip)
    offloaded = run(tmp_path, "offloaded", activation_offloading=True)
    assert len(entered) == 3 * 2  # one context per micro-step, none for the no-grad log-prob passes
    assert all(hooks.packed > 0 for hooks in entered)
    assert_same_steps(offloaded, plain, rel=1e-6)
    assert all(r["activation_offload_gib"] > 0 for r in offloaded)
    assert "activation_offload_gib" not in plain[0]


def test_activation_offloading_on_cpu_changes_nothing(tmp_path):
    plain = run(tmp_path, "plain", max_steps=2)
    offloaded = run(tmp_path, "offloaded", max_steps=2, activation_offloading=True)
    assert_same_steps(offloaded, plain, rel=1e-6)
    assert all(r["activation_offload_gib"] == 0 for r in offloaded)  # CPU tensors stay where they are


@pytest.mark.gpu
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_gpu_activation_offloading_matches_and_moves_bytes(tmp_path, gradient_checkpointing):
    """On CUDA (bf16, kernels applied) the saved activations really go to host memory and come back: same
    loss and gradient norm as without. Micro-batches of ~64 × 270 tokens, so that even the checkpointed layers'
    inputs ([tokens, 64] bf16) pass offload_activations' 1 MiB threshold."""
    model = ModelConfig(model_name_or_path="tiny", engine="hf")
    settings = dict(num_generations=8, per_device_train_batch_size=64, gradient_accumulation_steps=2,
                    max_completion_length=256, max_steps=1, gradient_checkpointing=gradient_checkpointing)
    plain = run(tmp_path, "plain", model, **settings)
    offloaded = run(tmp_path, "offloaded", model, activation_offloading=True, **settings)
    assert offloaded[0]["activation_offload_gib"] > 0
    # the loss (~0.04, a sum of terms that nearly cancel) varies by up to ~8e-5 between two identical runs on
    # an H100 without offloading, hence the absolute bound; grad_norm agrees to ~1e-5 relative
    assert_same_steps(offloaded, plain, rel=1e-3, atol=5e-4)

"""Data-parallel training on torch.distributed (gloo, CPU): two ranks train exactly like one process with twice
the batch; rank 0 alone writes; resume after a kill restores every rank; a failing or silent rank ends the job
within a bounded time with a clear error.

The ranks run in spawned processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the trainer discovers its rank exactly as under ``torchrun``; the last test starts the CLI
with torchrun itself.

Why a scripted engine for the 1-rank-vs-2-rank comparison: a sampling engine draws a completion from a random
stream that depends on the batch it is in and on the rank's seed (which must differ per rank), so two ranks
cannot reproduce one process's completions. The comparison is about what happens after sampling (global
advantages, loss normalisers, gradient averaging, metrics), so :class:`ScriptedEngine` makes each completion a
function of its prompt, its place in the prompt's group and the generation only, identical however the
generation is split between ranks, and reports the policy's own log-probs of it, as a sampling engine does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue as queue_module
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from unittest import mock

import pytest
import torch

from rlcore import GRPOConfig, ModelConfig
from rlcore.checkpoint import list_checkpoints, load_trainer_state
from rlcore.distributed import combine_metrics, launch_from_environment, loss_scale, metric_rule
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardFunction
from rlcore.rollout import Rollout, RolloutEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(32)]
WORLD = 2


# ---------------------------------------------------------------------------------------------- pure parts
def test_num_processes_follows_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert GRPOConfig().num_processes == 1
    with pytest.raises(ValueError, match="num_processes=2 .*torchrun --nproc_per_node 2"):
        GRPOConfig(num_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = GRPOConfig(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert (config.num_processes, config.generation_batch_size, config.prompts_per_generation) == (2, 16, 4)
    assert config.replace(seed=1).num_processes == 2
    with pytest.raises(ValueError, match="num_processes=3 .*WORLD_SIZE=2"):
        GRPOConfig(num_processes=3)
    with pytest.raises(ValueError, match="per_device_train_batch_size=2 .*whole groups"):
        GRPOConfig(num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="ddp_timeout"):
        GRPOConfig(ddp_timeout=0)


def test_launch_environment_is_checked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert launch_from_environment().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are unset: start the job with "
                                         "torchrun"):
        launch_from_environment()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="RANK=2 .*< WORLD_SIZE"):
        launch_from_environment()
    monkeypatch.setenv("RANK", "1")
    assert launch_from_environment().rank == 1


def test_loss_scale_makes_averaged_rank_losses_equal_one_process():
    """Independent of the trainer: the normalisers of rlcore.loss.aggregate, written out for a micro-step split
    over two ranks, must average (as the gradient all-reduce does) to the loss of the whole micro-step."""
    from rlcore.loss import aggregate

    generator = torch.Generator().manual_seed(0)
    per_token = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    mask = (torch.rand(8, 6, generator=generator) < 0.6).double()
    mask[5] = 0  # a completion the loss does not read
    halves = [slice(0, 4), slice(4, 8)]
    step_tokens = float(mask.sum()) * 3  # dapo: this micro-step and two others of the optimizer step
    for loss_type in ("dapo", "cispo", "grpo", "sapo", "bnpo", "dr_grpo", "luspo"):
        kwargs = dict(num_items_in_batch=step_tokens, max_completion_length=6, gradient_accumulation_steps=3)
        whole = aggregate(per_token, mask, loss_type, **kwargs)
        ranks = [aggregate(per_token[h], mask[h], loss_type, **kwargs)
                 * loss_scale(loss_type, 2, float(mask[h].sum()), float(mask.sum())) for h in halves]
        torch.testing.assert_close(sum(ranks) / 2, whole, rtol=1e-12, atol=0, msg=loss_type)


def test_combine_metrics_weights_means_sums_counts_and_keeps_peaks():
    rank0 = {"loss": 0.5, "reward_mean": 0.3, "grad_norm": 2.0, "completion_tokens": 100, "active_tokens": 30.0,
             "kl": 0.1, "mismatch_kl": 0.2, "completion_length_max": 12.0, "completion_length_min": 3.0,
             "peak_memory_gib": 1.0, "time_generate": 4.0, "tokens_per_second": 50.0, "update_skipped": False,
             "sample_completion": "a", "dynamic_sampling_groups_dropped": 2.0, "dynamic_sampling_filled": 1.0}
    rank1 = {"loss": 0.7, "reward_mean": 0.3, "grad_norm": 2.0, "completion_tokens": 300, "active_tokens": 10.0,
             "kl": 0.5, "mismatch_kl": 0.6, "completion_length_max": 9.0, "completion_length_min": 1.0,
             "peak_memory_gib": 3.0, "time_generate": 5.0, "tokens_per_second": 70.0, "update_skipped": False,
             "sample_completion": "b", "eval_reward_mean": 0.25, "dynamic_sampling_groups_dropped": 3.0,
             "dynamic_sampling_filled": 0.0}
    out = combine_metrics([rank0, rank1])
    assert out["loss"] == pytest.approx(0.6)
    assert out["kl"] == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)
    assert out["mismatch_kl"] == pytest.approx((100 * 0.2 + 300 * 0.6) / 400)
    assert (out["completion_tokens"], out["active_tokens"], out["tokens_per_second"]) == (400, 40.0, 120.0)
    assert (out["completion_length_max"], out["completion_length_min"], out["peak_memory_gib"]) == (12.0, 1.0, 3.0)
    assert out["time_generate"] == 5.0
    assert (out["reward_mean"], out["grad_norm"], out["update_skipped"], out["sample_completion"]) == (
        0.3, 2.0, False, "a")
    assert out["eval_reward_mean"] == 0.25  # a key only some ranks have
    assert (out["dynamic_sampling_groups_dropped"], out["dynamic_sampling_filled"]) == (5.0, 0.0)
    assert combine_metrics([rank0, rank1], combined={"kl"})["kl"] == 0.1  # already the job's: rank 0's
    assert metric_rule("rewards/correct/mean") == "same" and metric_rule("clip_ratio_low") == "token_mean"


# ---------------------------------------------------------------------------------------------- the harness
def run_ranks(target, args=(), world=WORLD, timeout=240.0, wait_all=True) -> dict[int, tuple[str, object, float]]:
    """Runs ``target(rank, *args)`` in ``world`` spawned processes with torchrun's environment.

    Returns {rank: (status, value, seconds since the start)}: ``("ok", result)``, ``("error", message)`` (the
    process then stays alive), or ``("exited", exit code)`` for a process that ended without reporting (e.g.
    ``os._exit``). With ``wait_all=False`` it returns once rank 0 has reported, and kills the others.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    started = time.monotonic()
    processes = [context.Process(target=_rank_main, args=(rank, world, port, target, args, results), daemon=True)
                 for rank in range(world)]
    for process in processes:
        process.start()
    out: dict[int, tuple[str, object, float]] = {}

    def collect(wait: float) -> None:
        try:
            rank, status, value, at = results.get(timeout=wait)
            out[rank] = (status, pickle.loads(value) if status == "ok" else value, at - started)
        except queue_module.Empty:
            pass
        for rank, process in enumerate(processes):
            if rank not in out and process.exitcode is not None and results.empty():
                out[rank] = ("exited", process.exitcode, time.monotonic() - started)

    try:
        while (len(out) < world if wait_all else 0 not in out) and time.monotonic() < started + timeout:
            collect(0.5)
        collect(0.5)  # what another rank reported meanwhile
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank, world, port, target, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    try:
        # plain pickle: a tensor put on the queue as is would be shared memory of a process about to exit
        value = pickle.dumps(target(rank, *args))
        results.put((rank, "ok", value, time.monotonic()))
    except BaseException as error:  # noqa: BLE001 - the test reads what each rank raised
        results.put((rank, "error", f"{type(error).__name__}: {error}", time.monotonic()))
        time.sleep(60)  # stay alive: the other ranks must stop without waiting for this process to end


# ---------------------------------------------------------------------------------------------- what ranks run
class EvenTokens(RewardFunction):
    """Share of completion tokens with an even id: a dense reward that differs between completions."""

    def __call__(self, prompts, completions, completion_ids, **columns):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


class ScriptedEngine(RolloutEngine):
    """Completion = f(generate call, prompt, occurrence of the prompt in the call), drawn from its own seeded
    generator: random lengths (some cut at max_tokens), random tokens, a stop token at the end otherwise. The
    log-probs are the policy's own, scored one completion at a time. Records which prompts it was given."""

    name = "scripted"

    def __init__(self, model, tokenizer, stop_id: int) -> None:
        self.model, self.tokenizer, self.stop_id = model, tokenizer, stop_id
        self.calls = 0
        self.prompts_seen: list[tuple[int, ...]] = []

    @torch.no_grad()
    def generate(self, prompt_ids, sampling):
        occurrence: Counter = Counter()
        rollouts = []
        was_training = self.model.training
        self.model.eval()
        for ids in prompt_ids:
            key = (self.calls, tuple(ids), occurrence[tuple(ids)])
            occurrence[tuple(ids)] += 1
            self.prompts_seen.append(tuple(ids))
            generator = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            length = int(torch.randint(1, sampling.max_tokens + 1, (1,), generator=generator))
            tokens = torch.randint(5, 1500, (length,), generator=generator).tolist()
            finish = "length" if length == sampling.max_tokens else "stop"
            if finish == "stop":
                tokens[-1] = self.stop_id
            sequence = torch.tensor([list(ids) + tokens])
            logits = self.model(input_ids=sequence).logits[0, len(ids) - 1:-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            rollouts.append(Rollout(list(ids), tokens, self.tokenizer.decode(tokens), logprobs.tolist(), finish))
        self.model.train(was_training)
        self.calls += 1
        return rollouts


BASE = dict(num_generations=4, gradient_accumulation_steps=2, max_completion_length=8, max_prompt_length=64,
            learning_rate=1e-3, max_steps=2, seed=3, gradient_checkpointing=False, save_steps=500)


def scripted_run(output_dir: str, per_device: int, overrides: dict) -> dict:
    """Trains with the scripted engine; returns per-step metrics, the final LoRA weights, the prompts given."""
    from rlcore.trainer import GRPOTrainer

    values = {**BASE, **overrides, "output_dir": output_dir, "per_device_train_batch_size": per_device}
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", cpu_threads=1),
                          reward_funcs=[EvenTokens()], args=GRPOConfig(**values), train_dataset=ROWS,
                          show_progress=False)
    trainer.engine = ScriptedEngine(trainer.model, trainer.tokenizer, trainer.tokenizer.eos_token_id)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    steps = []
    trainer.callbacks.append(lambda t, step, metrics: steps.append(dict(metrics)))
    with mock.patch("rlcore.reporting.plot_metrics", return_value=None):  # the plot is not what is compared here
        trainer.train()
    lora = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    return {"steps": steps, "initial": initial, "lora": lora, "prompts": trainer.engine.prompts_seen}


CASES = [
    *[dict(loss_type=loss, scale_rewards=scale) for loss in ("dapo", "grpo", "dr_grpo", "bnpo")
      for scale in ("group", "batch")],
    dict(loss_type="cispo", epsilon_high=5.0, scale_rewards="batch"),
    dict(loss_type="sapo", scale_rewards="group"),
    dict(loss_type="luspo", importance_sampling_level="sequence", scale_rewards="batch"),
    # off-policy: two optimizer steps per generation, each generation used twice (old log-probs, the buffer
    # kept across steps), and the KL term (reference log-probs)
    dict(loss_type="bnpo", scale_rewards="batch", steps_per_generation=4, num_iterations=2, beta=0.04),
    dict(loss_type="dapo", scale_rewards="group", steps_per_generation=4, mask_truncated_completions=True),
]
# per-rank batch 2 with groups of 4: each rank holds one whole group, two micro-steps of half of it; every
# optimizer step still sees the completions one process would (accumulation 2 covers whole shares)
HALF_GROUP_CASES = [dict(loss_type="dapo", scale_rewards="batch"), dict(loss_type="grpo", scale_rewards="batch")]


def _equality_worker(rank, root):
    out = []
    for i, case in enumerate(CASES):
        out.append(scripted_run(os.path.join(root, f"two-{i}"), 4, case))
    for i, case in enumerate(HALF_GROUP_CASES):
        out.append(scripted_run(os.path.join(root, f"two-half-{i}"), 2, case))
    return out


@pytest.fixture
def one_thread():
    """torch's CPU threads at 1 for the test (the runs set it, cpu_threads=1), as they were afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_two_ranks_train_exactly_like_one_process_with_twice_the_batch(tmp_path, one_thread):
    results = run_ranks(_equality_worker, (str(tmp_path),), timeout=400)
    assert [results[r][0] for r in range(WORLD)] == ["ok", "ok"], results
    two = [results[r][1] for r in range(WORLD)]
    cases = [(case, 4) for case in CASES] + [(case, 2) for case in HALF_GROUP_CASES]
    for i, (case, per_rank) in enumerate(cases):
        one = scripted_run(str(tmp_path / f"one-{i}"), WORLD * per_rank, case)
        ranks = [two[r][i] for r in range(WORLD)]
        # each rank generated its own prompts, whole groups, and together exactly one process's
        seen = [Counter(r["prompts"]) for r in ranks]
        assert not set(seen[0]) & set(seen[1]), case
        assert seen[0] + seen[1] == Counter(one["prompts"]), case
        assert all(count == BASE["num_generations"] for s in seen for count in s.values()), case
        for key in ("loss", "grad_norm", "reward_mean", "reward_std", "advantage_reward_std_group_mean",
                    "completion_length_mean", "truncated_fraction", "kl"):
            if key not in one["steps"][0]:
                continue
            expected = [s[key] for s in one["steps"]]
            for rank in range(WORLD):  # every rank reports the job's metrics
                assert [s[key] for s in ranks[rank]["steps"]] == pytest.approx(expected, rel=1e-5, abs=1e-6), \
                    (case, key)
        assert len({round(s["loss"], 7) for s in one["steps"]} | {0.0}) > 1, case  # the loss is not trivially 0
        assert one["steps"][-1]["grad_norm"] > 0, case
        for name, weight in one["lora"].items():
            assert torch.equal(ranks[0]["lora"][name], ranks[1]["lora"][name]), (case, name)  # ranks in lockstep
        # Adam moves a weight by about the learning rate whatever its gradient's size, so an element whose gradient
        # is float noise in both runs moves differently (seen: up to 2% of one step of 1e-3): elements within a
        # tenth of a step, the whole update within 0.1%. (Adam hides a uniformly scaled gradient: grad_norm and
        # the loss above catch that.)
        names = sorted(one["lora"])
        update_one = torch.cat([(one["lora"][n] - one["initial"][n]).flatten() for n in names])
        update_two = torch.cat([(ranks[0]["lora"][n] - one["initial"][n]).flatten() for n in names])
        torch.testing.assert_close(update_two, update_one, rtol=0, atol=1e-4, msg=str(case))
        assert float((update_two - update_one).norm() / update_one.norm()) < 1e-3, case
        assert float(update_one.abs().max()) > 1e-3, case  # the adapter really moved
    # rank 0 alone wrote: one metrics line per step, checkpoints with both ranks' state
    run = tmp_path / "two-0"
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2]
    state = load_trainer_state(list_checkpoints(str(run))[-1])
    assert state["world_size"] == WORLD and len(state["other_ranks"]) == WORLD - 1


# ---------------------------------------------------------------------------------------------- resume after a kill
def _sampling_run(rank, output_dir, crash_at, resume):
    """The real HF engine (a different sampling seed on each rank) with LoRA dropout (each rank's own RNG)."""
    from rlcore.trainer import GRPOTrainer

    config = GRPOConfig(**{**BASE, "max_steps": 4, "save_steps": 3, "steps_per_generation": 4,
                           "per_device_train_batch_size": 4, "max_completion_length": 10}, output_dir=output_dir)
    model = ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", cpu_threads=1, lora_dropout=0.1)

    def crash(trainer, step, metrics):
        if step == crash_at and rank == 1:
            os._exit(17)  # a hard kill of one rank, right after checkpoint-3

    trainer = GRPOTrainer(model, reward_funcs=[EvenTokens()], args=config, train_dataset=ROWS, show_progress=False,
                          callbacks=[crash])
    with mock.patch("rlcore.reporting.plot_metrics", return_value=None):
        summary = trainer.train(resume_from_checkpoint=resume)
    return {k: summary[k] for k in ("first_step", "steps_run")}


def _full_then_crashed(rank, root):
    # one process group for both runs (the second trainer joins the group the first one created)
    _sampling_run(rank, os.path.join(root, "full"), None, None)
    return _sampling_run(rank, os.path.join(root, "crashed"), 3, None)


@pytest.mark.slow
def test_resume_after_a_killed_rank_restores_every_rank(tmp_path):
    crashed = run_ranks(_full_then_crashed, (str(tmp_path),), wait_all=False)
    expected = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    assert [r["step"] for r in expected] == [1, 2, 3, 4]
    assert crashed[1][:2] == ("exited", 17), crashed
    assert crashed[0][0] == "error" and "rank 0 of 2 stops: another rank stopped" in crashed[0][1], crashed
    assert crashed[0][2] - crashed[1][2] < 20, crashed  # rank 0 did not wait for its timeout (1800 s)
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path / "crashed"))] == ["checkpoint-3"]

    resumed = run_ranks(_sampling_run, (str(tmp_path / "crashed"), None, True))
    assert [resumed[r][0] for r in range(WORLD)] == ["ok", "ok"], resumed
    assert (resumed[0][1]["first_step"], resumed[0][1]["steps_run"]) == (3, 1)
    records = read_metrics(str(tmp_path / "crashed" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "reward_mean", "completion_length_mean"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], abs=1e-6), key
    assert len({round(r["loss"], 6) for r in expected}) > 1


# ---------------------------------------------------------------------------------------------- failures end the job
class FailsOnRankOne(RewardFunction):
    """Raises (or hangs) on rank 1's second batch; scores like EvenTokens otherwise."""

    timeout = None  # run in the calling thread: a hang is a real hang

    def __init__(self, hang: bool = False) -> None:
        super().__init__()
        self.calls, self.hang = 0, hang

    def __call__(self, prompts, completions, completion_ids, **columns):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 2:
            if self.hang:
                time.sleep(120)
            raise RuntimeError("the reward service is down")
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _failing_run(rank, output_dir, hang, timeout_seconds):
    from rlcore.trainer import GRPOTrainer

    config = GRPOConfig(**{**BASE, "max_steps": 3, "per_device_train_batch_size": 4}, output_dir=output_dir,
                        ddp_timeout=timeout_seconds)
    model = ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", cpu_threads=1)
    trainer = GRPOTrainer(model, reward_funcs=[FailsOnRankOne(hang)], args=config, train_dataset=ROWS,
                          show_progress=False)
    trainer.train()


def test_a_rank_that_raises_stops_the_job_at_once(tmp_path):
    results = run_ranks(_failing_run, (str(tmp_path / "run"), False, 1800), wait_all=False, timeout=120)
    (status0, message0, at0), (status1, message1, at1) = results[0], results[1]
    assert status1 == "error" and "RewardError" in message1 and "the reward service is down" in message1
    # rank 0 quotes rank 1's error and says where it was waiting
    assert status0 == "error" and message0.startswith("RankFailedError: rank 0 of 2 stops: rank 1 failed with "
                                                      "RewardError"), results
    assert "the reward service is down" in message0 and "during the rewards of generation 1" in message0
    # rank 1's process is still alive (it sleeps after its error), and rank 0 did not wait for it
    assert at0 - at1 < 5, results


@pytest.mark.slow
def test_a_rank_that_hangs_is_given_up_after_ddp_timeout(tmp_path):
    # rank 1 hangs for 120 s in its reward; rank 0 gives up after ddp_timeout, not after the hang
    results = run_ranks(_failing_run, (str(tmp_path / "run"), True, 10), wait_all=False, timeout=100)
    status0, message0, at0 = results[0]
    assert status0 == "error" and "no answer from the other ranks within ddp_timeout=10 s" in message0, results
    assert "the rewards of generation 1" in message0
    assert at0 < 90 and 1 not in results


# ---------------------------------------------------------------------------------------------- torchrun itself
def test_torchrun_cli_two_processes(tmp_path):
    out = tmp_path / "gsm8k"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"),
               "--set", "model=tiny", "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "save_steps=2",
               "--set", "per_device_train_batch_size=4", "--set", "max_completion_length=8", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 2 steps in") == 1  # rank 0 alone reports
    config = json.loads(result.stdout.split("config: ", 1)[1].splitlines()[0])
    assert config["num_processes"] == 2 and config["generation_batch_size"] == 8  # 2 ranks × 4 completions
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]
    state = load_trainer_state(str(out / "checkpoint-2"))
    assert state["world_size"] == 2 and len(state["other_ranks"]) == 1
    assert set(state["other_ranks"][0]["buffers"]) == set(state["buffers"])


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_torchrun_two_gpus(tmp_path, engine):
    """Two GPUs, NCCL: each rank on its own GPU with its own engine (vLLM: external_launcher in the job's group)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "run"
    settings = ["model=tiny", f"engine={engine}", "dtype=bfloat16", f"output_dir={out}", "max_steps=3",
                "save_steps=3", "per_device_train_batch_size=4", "max_completion_length=16", "enforce_eager=True",
                "gpu_memory_utilization=0.3", "max_seq_length=512"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"),
               "--no-progress"] + [part for setting in settings for part in ("--set", setting)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
                            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "backend nccl" in result.stderr and result.stdout.count("done: 3 steps in") == 1
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in records)
    # every rank's engine samples from the weights its trainer holds (its own GPU, its own synced LoRA)
    assert records[-1]["mismatch_logp_diff_mean"] < 0.05
    state = load_trainer_state(str(out / "checkpoint-3"))
    assert state["world_size"] == 2 and len(state["other_ranks"]) == 1

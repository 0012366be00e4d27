"""Data-parallel training over torch.distributed, launched by torchrun: one process (rank) per GPU.

Each rank holds a whole copy of the policy with its own rollout engine (the one-GPU design, unchanged),
generates and scores its share of every generation (whole groups: :meth:`rlcore.batching.BatchSchedule.
rank_groups`) and trains on it. Before each optimizer step the LoRA gradients are averaged across ranks with one
all-reduce of a flat buffer, so every rank applies the same update and the adapters stay identical.

What crosses ranks, and why W ranks then train like one process with W times the batch:

* each generation's rewards (all-gathered): advantages and reward metrics are computed on the whole
  generation, so ``scale_rewards="batch"`` divides by the std over every rank's completions;
* per optimizer step, one all-reduce of token counts: ``dapo``/``cispo`` divide by the active tokens of the
  whole step, ``bnpo`` by those of the micro-step over every rank (:func:`loss_scale`);
* the gradients, summed together with a flag saying whether some rank had a NaN/inf loss, so that every rank
  skips the same steps (:meth:`Ranks.average_gradients`);
* per step, every rank's metrics, combined by :func:`combine_metrics`; rank 0 alone writes them, the plot and
  the checkpoints, which hold every rank's RNG state and rollout buffer.

One process (a plain ``python`` run, WORLD_SIZE unset) needs no process group: every method is then the
identity and no collective is called.

Failures end the whole job, never a hang. A rank that raises leaves its error in a small TCP store of the job
(served by rank 0); every exchange waits in a loop that looks there, so the other ranks stop within
milliseconds with :class:`RankFailedError` quoting it, even mid-exchange and whatever the failed process does
next. A rank killed outright closes its connections (gloo: the others' exchange fails at once) or is ended
together with the others by torchrun. A rank that neither fails nor answers is given up on after
``GRPOConfig.ddp_timeout`` seconds.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rlcore.config import launched_processes

logger = logging.getLogger("rlcore")

T = TypeVar("T")
# Per-rank seeds are spread this far apart, more than any run has generations (the engine's per-generation seed
# grows by 1 per generation), so no two ranks ever sample with the same seed.
RANK_SEED_STRIDE = 1_000_003
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailedError(RuntimeError):
    """This rank stops because another one did: it failed, was killed, or did not answer within ddp_timeout."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher (torchrun) describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its machine


def launch_from_environment(environ: Any = None) -> Launch:
    """Reads torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and checks ``MASTER_ADDR``/``MASTER_PORT``).

    Rank 0 of 1 when ``WORLD_SIZE`` is unset (a plain ``python`` run). Raises ``ValueError`` naming the variable
    when they are inconsistent (a hand-made environment rather than torchrun's).
    """
    environ = os.environ if environ is None else environ
    world, _ = launched_processes(environ)
    if world == 1:
        return Launch()
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"unset: start the job with torchrun --nproc_per_node {world} -m rlcore.run ..., which "
                         "sets all of them")
    values = {}
    for name in ("RANK", "LOCAL_RANK"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name}={environ[name]!r} is not allowed: expected an integer") from None
    if not 0 <= values["RANK"] < world:
        raise ValueError(f"RANK={values['RANK']} is not allowed: expected 0 <= RANK < WORLD_SIZE ({world})")
    if values["LOCAL_RANK"] < 0:
        raise ValueError(f"LOCAL_RANK={values['LOCAL_RANK']} is not allowed: expected an integer >= 0")
    return Launch(values["RANK"], world, values["LOCAL_RANK"])


def process_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random streams (dropout, anything drawn from the global RNG): ``seed`` on rank 0,
    so one process seeds exactly as before, and (seed + rank · 1,000,003) mod 2³² on the others."""
    return seed if rank == 0 else (seed + rank * RANK_SEED_STRIDE) % 2**32


def engine_seed(seed: int, rank: int) -> int:
    """The rollout engine's sampling seed on ``rank``: ``seed`` on rank 0, seed + rank · 1,000,003 elsewhere, so
    the ranks draw different completions (their prompts differ too, but a seed must never be shared)."""
    return seed if rank == 0 else seed + rank * RANK_SEED_STRIDE


def loss_scale(loss_type: str, world_size: int, rank_tokens: float, all_tokens: float) -> float:
    """The factor on one rank's micro-batch loss that makes W ranks equal one process at W times the batch.

    Gradients are averaged over the W ranks (divided by W), and each rank computes its loss with the
    normalisers of :func:`rlcore.loss.aggregate` applied to its own micro-batch of b completions. Against one
    process holding the W micro-batches together (B = W·b):

    * ``grpo``, ``sapo``, ``dr_grpo``, ``luspo`` divide by B (or B × max_completion_length): 1/b on each rank,
      averaged over W ranks gives 1/(W·b). Factor 1.
    * ``dapo``, ``cispo`` divide by the active tokens of the whole optimizer step; the trainer passes the count
      over every rank, so each rank's share must be multiplied back by W. Factor W.
    * ``bnpo`` divides by the micro-step's active tokens: a rank divides by its own, max(1, Tᵣ), one process by
      max(1, Σᵣ Tᵣ). Factor W · max(1, Tᵣ) / max(1, Σᵣ Tᵣ), with Tᵣ = ``rank_tokens``, Σᵣ Tᵣ = ``all_tokens``.
    """
    if world_size == 1:
        return 1.0
    if loss_type in ("dapo", "cispo"):
        return float(world_size)
    if loss_type == "bnpo":
        return world_size * max(1.0, rank_tokens) / max(1.0, all_tokens)
    return 1.0


# ---------------------------------------------------------------------------------------------- metrics
# identical on every rank by construction: statistics of the whole generation (its rewards are all-gathered),
# the update (computed after the gradient all-reduce), greedy evaluation of the same adapter
_SAME_KEYS = {"grad_norm", "learning_rate", "update_skipped", "skipped_steps_total"}
_SAME_PREFIXES = ("reward_", "rewards/", "advantage_", "eval_")
_SUM_KEYS = {"completion_tokens", "generated_tokens", "prompts_truncated", "active_tokens"}
_SUM_PREFIXES = ("dynamic_sampling_",)  # groups dropped, rounds, extra completions: counts over every rank
_MAX_KEYS = {"peak_memory_gib", "device_memory_used_gib", "activation_offload_gib", "standby_freed_gib",
             "standby_freed_device_gib"}
# means over the tokens the loss reads: weighted by each rank's active_tokens
_TOKEN_MEANS = {"clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "cispo_clip_ratio",
                "importance_ratio_mean", "kl", "entropy", "sampler_logp_diff_mean", "sampler_kl"}
# means over a generation's completion tokens: weighted by each rank's completion_tokens
_GENERATION_MEAN_PREFIXES = ("mismatch_", "sampling_is_")


def metric_rule(key: str) -> str:
    """How :func:`combine_metrics` combines ``key`` over ranks: ``"same"`` (rank 0's), ``"max"``, ``"min"``,
    ``"sum"``, ``"token_mean"``, ``"generation_mean"`` (weighted means) or ``"mean"``."""
    if key in _SAME_KEYS or key.startswith(_SAME_PREFIXES):
        return "same"
    if key.endswith("_max") or key in _MAX_KEYS or key.startswith("time_") or key.endswith("_seconds"):
        return "max"
    if key.endswith("_min") or key == "dynamic_sampling_filled":  # filled: on every rank
        return "min"
    if key in _SUM_KEYS or key.endswith("_per_second") or key.startswith(_SUM_PREFIXES):
        return "sum"
    if key in _TOKEN_MEANS:
        return "token_mean"
    if key.startswith(_GENERATION_MEAN_PREFIXES):
        return "generation_mean"
    return "mean"


def combine_metrics(per_rank: Sequence[dict[str, Any]], combined: Collection[str] = ()) -> dict[str, Any]:
    """Metrics for the whole job from every rank's (rank 0 first), key by key (:func:`metric_rule`); keys in
    ``combined`` are already the job's (identical on every rank) and are taken from rank 0.

    * ``same``: rank 0's value (the rank-independent ones: rewards, advantages, grad_norm, learning_rate, eval);
    * ``sum``: counts (completion_tokens, generated_tokens, prompts_truncated, active_tokens,
      ``dynamic_sampling_*``) and throughputs (``*_per_second``: the ranks work at the same time);
    * ``max``: peaks and times (memory, ``*_max``, ``time_*``: the step lasts as long as its slowest rank);
      ``min`` for ``*_min`` and ``dynamic_sampling_filled`` (1 only when every rank filled its share);
    * ``token_mean``: Σᵣ wᵣ xᵣ / Σᵣ wᵣ with wᵣ the rank's ``active_tokens`` (clip ratios, KL, entropy);
      ``generation_mean``: the same with ``completion_tokens`` (train/inference mismatch, IS weights);
    * ``mean``: the plain mean, exact where every rank holds the same number of items (loss: each rank's loss
      is W times its share, see :func:`loss_scale`; completion lengths, truncated fraction).

    A key some ranks lack is combined over those that have it; a value that is not a number is rank 0's.
    """
    if len(per_rank) == 1:
        return dict(per_rank[0])
    keys = list(per_rank[0]) + [k for m in per_rank[1:] for k in m if k not in per_rank[0]]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        present = [m for m in per_rank if key in m]
        values = [m[key] for m in present]
        rule = "same" if key in combined else metric_rule(key)
        if rule == "same" or not all(_is_number(v) for v in values):
            out[key] = values[0]
        elif rule == "max":
            out[key] = max(values)
        elif rule == "min":
            out[key] = min(values)
        elif rule == "sum":
            out[key] = sum(values)
        elif rule in ("token_mean", "generation_mean"):
            weight_key = "active_tokens" if rule == "token_mean" else "completion_tokens"
            weights = [m.get(weight_key) for m in present]
            if all(_is_number(w) for w in weights) and sum(weights) > 0:
                out[key] = float(sum(w * v for w, v in zip(weights, values)) / sum(weights))
            else:
                out[key] = float(sum(values) / len(values))
        else:
            out[key] = float(sum(values) / len(values))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- the ranks
FAILURE_KEY = "rlcore/failed"
_POLL_SECONDS = (0.0005, 0.05)  # first and longest pause between two looks at a pending exchange


class Ranks:
    """This process's rank and the exchanges training needs. With one process every method is the identity.

    Build it with :func:`setup`. Every exchange is started asynchronously and waited for in a loop that also
    looks at a key of a small TCP store of the job: a rank that fails writes its error there (:meth:`fail`), so
    the others stop within milliseconds, quoting it, whatever state the failed rank's process is in; a rank that
    does not answer within ``timeout_seconds`` is given up on. ``device`` is where the gradient all-reduce runs
    (the GPU with NCCL, the CPU with gloo); the small exchanges (counts, rewards, metrics, checkpoint state) go
    through a gloo group as pickled bytes.
    """

    def __init__(self, launch: Launch = Launch(), timeout_seconds: float = 1800.0,
                 device: torch.device | None = None, objects_group: Any = None, store: Any = None,
                 owns_group: bool = False) -> None:
        self.rank = launch.rank
        self.world_size = launch.world_size
        self.local_rank = launch.local_rank
        self.timeout_seconds = timeout_seconds
        self.device = device or torch.device("cpu")
        self._objects_group = objects_group
        self._store = store
        self._owns_group = owns_group
        self._stopped = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, the plot and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ------------------------------------------------------------------ exchanges
    def all_reduce_sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sum over ranks (float64: token counts stay exact up to 2⁵³)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._wait(what, lambda: dist.all_reduce(tensor, group=self._objects_group, async_op=True))
        return tensor.tolist()

    def all_gather_objects(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        data, sizes = self._payload(value, what)
        gathered = [torch.empty_like(data) for _ in range(self.world_size)]
        self._wait(what, lambda: dist.all_gather(gathered, data, group=self._objects_group, async_op=True))
        return [_unpickle(tensor, size) for tensor, size in zip(gathered, sizes)]

    def gather_objects(self, value: Any, what: str) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        data, sizes = self._payload(value, what)
        gathered = [torch.empty_like(data) for _ in range(self.world_size)] if self.is_main else None
        self._wait(what, lambda: dist.gather(data, gathered, dst=0, group=self._objects_group, async_op=True))
        return [_unpickle(tensor, size) for tensor, size in zip(gathered, sizes)] if self.is_main else None

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        payload = pickle.dumps(value) if self.is_main else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._wait(what, lambda: dist.broadcast(size, src=0, group=self._objects_group, async_op=True))
        data = _as_bytes_tensor(payload, int(size)) if self.is_main else torch.empty(int(size), dtype=torch.uint8)
        self._wait(what, lambda: dist.broadcast(data, src=0, group=self._objects_group, async_op=True))
        return _unpickle(data, int(size))

    def run_on_main(self, what: str, function: Callable[[], T]) -> T:
        """Runs ``function`` on rank 0 only and hands its result to every rank.

        If it raises, rank 0 raises that error and every other rank a :class:`RankFailedError` quoting it, so
        all ranks stop together (instead of the others waiting for rank 0 at their next exchange).
        """
        if not self.distributed:
            return function()
        error: BaseException | None = None
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", function())
            except Exception as raised:
                error = raised
                outcome = ("error", f"{type(raised).__name__}: {raised}")
        outcome = self.broadcast_object(outcome, what)
        if error is not None:
            raise error
        status, value = outcome
        if status == "error":
            raise RankFailedError(f"rank {self.rank} of {self.world_size} stops: rank 0 failed during {what}: "
                                  f"{value}")
        return value

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter], nonfinite: bool, what: str) -> bool:
        """Replaces every parameter's gradient by its mean over ranks; returns whether any rank had a NaN/inf loss.

        One all-reduce (sum) of a float32 buffer: every gradient flattened, then one presence flag per
        parameter (a parameter without a gradient on some rank counts as zeros there, and one that no rank has a
        gradient for keeps ``grad=None``, as with one process), then the non-finite flag. A NaN/inf gradient on
        one rank makes every rank's mean non-finite, so every rank skips the update.
        """
        if not self.distributed:
            return nonfinite
        import torch.distributed as dist

        parameters = list(parameters)
        sizes = [p.numel() for p in parameters]
        total = sum(sizes)
        buffer = torch.zeros(total + len(parameters) + 1, dtype=torch.float32, device=self.device)
        offset = 0
        for parameter, size in zip(parameters, sizes):
            if parameter.grad is not None:
                buffer[offset:offset + size].copy_(parameter.grad.reshape(-1))
            offset += size
        flags = [1.0 if p.grad is not None else 0.0 for p in parameters] + [1.0 if nonfinite else 0.0]
        buffer[total:].copy_(torch.tensor(flags, dtype=torch.float32))
        self._wait(what, lambda: dist.all_reduce(buffer, async_op=True))
        present = buffer[total:total + len(parameters)].tolist()
        buffer[:total].div_(self.world_size)
        offset = 0
        for parameter, size, count in zip(parameters, sizes, present):
            if count > 0:
                mean = buffer[offset:offset + size].view(parameter.shape)
                if parameter.grad is None:
                    parameter.grad = mean.to(dtype=parameter.dtype, copy=True)
                else:
                    parameter.grad.copy_(mean)
            offset += size
        return bool(buffer[-1].item() > 0)

    def broadcast_parameters(self, parameters: Sequence[torch.nn.Parameter], what: str) -> None:
        """Copies rank 0's values of ``parameters`` to every rank (one flat broadcast), so that all ranks start
        from the same adapter whatever their own initialisation drew."""
        if not self.distributed:
            return
        import torch.distributed as dist

        parameters = list(parameters)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(device=self.device, dtype=torch.float32)
                              for p in parameters])
            self._wait(what, lambda: dist.broadcast(flat, src=0, async_op=True))
            offset = 0
            for parameter in parameters:
                size = parameter.numel()
                parameter.copy_(flat[offset:offset + size].view(parameter.shape))
                offset += size

    # ------------------------------------------------------------------ stopping
    def fail(self, error: BaseException) -> None:
        """Called on the rank where ``error`` was raised: writes it to the job's store, where every other rank
        finds it at its next look (within milliseconds, even in the middle of an exchange), then tears the
        process group down. An error that is itself another rank's failure is not passed on again."""
        if not self.distributed or self._stopped:
            return
        if not isinstance(error, RankFailedError):
            note = f"rank {self.rank} failed with {type(error).__name__}: {str(error)[:1000]}"
            logger.error("%s; stopping the other ranks", note)
            try:
                self._store.set(FAILURE_KEY, note)
            except Exception as store_error:  # the store lives on rank 0, which may be gone already
                logger.debug("could not leave the failure note: %s", store_error)
        self._tear_down()

    def shutdown(self) -> None:
        """The end of a run: waits until every rank got here (none is still reading what another sent), then
        destroys the process group if this object created it. Nothing after a :meth:`fail`."""
        if self._stopped or not self.distributed:
            return
        self.all_reduce_sum([0.0], "the end of the run")
        self._tear_down()

    def _tear_down(self) -> None:
        self._stopped = True
        if not self._owns_group:
            return
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as error:  # tearing down after a failure: never bury the error that led here
            logger.debug("destroying the process group failed: %s", error)

    # ------------------------------------------------------------------ waiting
    def _payload(self, value: Any, what: str) -> tuple[torch.Tensor, list[int]]:
        """``value`` pickled into a uint8 tensor padded to the longest of all ranks, and every rank's length."""
        import torch.distributed as dist

        payload = pickle.dumps(value)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._wait(what, lambda: dist.all_gather(sizes, size, group=self._objects_group, async_op=True))
        lengths = [int(s) for s in sizes]
        return _as_bytes_tensor(payload, max(lengths)), lengths

    def _wait(self, what: str, start: Callable[[], Any]) -> None:
        """Starts an asynchronous exchange and waits for it, looking at the failure note in between; raises
        :class:`RankFailedError` when another rank failed, left, or did not answer within the timeout."""
        if self._stopped:
            raise RankFailedError(f"rank {self.rank} of {self.world_size}: the process group is gone, "
                                  f"{what} is not possible")
        deadline = time.monotonic() + self.timeout_seconds
        pause = _POLL_SECONDS[0]
        try:
            work = start()
            while not work.is_completed():
                self._check_others(what)
                if time.monotonic() > deadline:
                    raise RankFailedError(self._stopping(
                        what, f"no answer from the other ranks within ddp_timeout={self.timeout_seconds:g} s (a "
                              "rank is stuck, or much slower than the others; raise ddp_timeout if that is "
                              "expected)"))
                time.sleep(pause)
                pause = min(2 * pause, _POLL_SECONDS[1])
            work.wait()
        except RankFailedError:
            raise
        except RuntimeError as error:  # gloo: RuntimeError (a peer closed); NCCL: DistBackendError (a RuntimeError)
            self._check_others(what)
            text = str(error).strip()
            first = text.splitlines()[0][:300] if text else ""
            raise RankFailedError(self._stopping(
                what, f"another rank stopped (its own error is in its output) [{type(error).__name__}: {first}]"
            )) from error

    def _check_others(self, what: str) -> None:
        try:
            failed = self._store.check([FAILURE_KEY]) if self._store is not None else False
            note = self._store.get(FAILURE_KEY).decode("utf-8", "replace") if failed else None
        except Exception:  # the store lives on rank 0: it is gone with rank 0
            note = "rank 0 stopped (its own error is in its output)"
        if note is not None:
            raise RankFailedError(self._stopping(what, note))

    def _stopping(self, what: str, reason: str) -> str:
        return f"rank {self.rank} of {self.world_size} stops: {reason}; during {what}"


def _as_bytes_tensor(payload: bytes, length: int) -> torch.Tensor:
    data = torch.zeros(length, dtype=torch.uint8)
    if payload:
        data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return data


def _unpickle(data: torch.Tensor, size: int) -> Any:
    # the ranks of one job trust each other as one process trusts itself (torch's object collectives pickle too)
    return pickle.loads(data[:size].numpy().tobytes())


def setup(num_processes: int, timeout_seconds: float) -> Ranks:
    """This process's :class:`Ranks`; with several, joins (or creates) the job's process group.

    ``num_processes`` is ``GRPOConfig.num_processes``; it must equal the launcher's WORLD_SIZE. On CUDA each
    rank takes the GPU ``LOCAL_RANK`` (``torch.cuda.set_device``, before any model loads) and NCCL carries the
    gradients; on the CPU gloo does. A process group already created by the caller is used as it is. Rank 0
    also starts the small TCP store where a failing rank leaves its error (:meth:`Ranks.fail`).
    """
    launch = launch_from_environment()
    if launch.world_size != num_processes:
        raise ValueError(f"num_processes={num_processes} is not allowed: the launcher started "
                         f"{launch.world_size} process{'es' if launch.world_size != 1 else ''} (WORLD_SIZE); "
                         "leave num_processes unset to follow it")
    if launch.world_size == 1:
        return Ranks(launch, timeout_seconds)
    import torch.distributed as dist

    # the backend's own timeout is the last resort: the exchanges give up after timeout_seconds themselves
    backend_timeout = datetime.timedelta(seconds=timeout_seconds + 60)
    cuda = torch.cuda.is_available()
    if cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={launch.local_rank} but this machine shows {torch.cuda.device_count()} "
                             "GPU(s): start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(launch.local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=backend_timeout)
    elif (dist.get_world_size(), dist.get_rank()) != (launch.world_size, launch.rank):
        raise ValueError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, but the launcher says rank {launch.rank} of {launch.world_size}")
    backend = dist.get_backend()
    objects_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=backend_timeout)
    store = _failure_store(launch, objects_group, backend_timeout)
    device = torch.device("cuda", launch.local_rank) if backend == "nccl" else torch.device("cpu")
    logger.info("rank %d of %d (local rank %d), %s, backend %s, ddp_timeout %g s", launch.rank, launch.world_size,
                launch.local_rank, device, backend, timeout_seconds)
    return Ranks(launch, timeout_seconds, device, objects_group, store, owns)


def _failure_store(launch: Launch, objects_group: Any, timeout: datetime.timedelta) -> Any:
    """A TCP store served by rank 0 on a free port (told to the others through the process group), separate
    from the launcher's: only the failure note lives there."""
    import torch.distributed as dist

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore(host, 0, launch.world_size, True, timeout=timeout, wait_for_workers=False) \
        if launch.rank == 0 else None
    port = torch.tensor([store.port if store is not None else 0], dtype=torch.int64)
    dist.broadcast(port, src=0, group=objects_group)
    return store if store is not None else dist.TCPStore(host, int(port), launch.world_size, False, timeout=timeout)


def vllm_engine_kwargs(seed: int) -> dict[str, Any]:
    """``vllm.LLM`` settings for a rank of a multi-process job ({} with one process).

    ``distributed_executor_backend="external_launcher"`` (vLLM 0.26) runs vLLM's single worker in this process,
    on the GPU ``LOCAL_RANK`` and inside the job's process group, instead of starting a world of its own on GPU 0;
    each rank's engine then serves that rank alone (tensor parallel size 1). The engine seed differs per rank.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return {}
    rank = torch.distributed.get_rank()
    return {"distributed_executor_backend": "external_launcher", "seed": engine_seed(seed, rank)}


"""Summaries, the side-by-side markdown tables, the bounded longest-completion search of ``vs_trl.py`` and the
longest length estimated from the training-phase memory of its probes.

Pure functions over the JSON records the framework processes write, so they run (and are tested) on a CPU.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FRAMEWORKS = ("rlcore", "trl")
LABELS = {"rlcore": "rlcore", "trl": "TRL 1.16 colocate"}
STEP_FIELDS = ("step_s", "generate_s", "weight_sync_s", "standby_s", "train_and_rest_s", "logprob_pass_s",
               "forward_backward_s")
TRAINING_PHASES = ("logprob_pass", "forward_backward")  # vs_trl_measure.TRAINING_PHASES (kept import-free)
MEMORY_MARGIN_GIB = 2.0  # kept free below the device total in the length estimate (allocator slack, fragments)


def summarize_run(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Medians over the steps after the first ``warmup`` of one framework × setting run.

    ``generate_tok_s`` is the median over steps of generated tokens / generation seconds; ``peak_device_gib``
    is the largest device memory in use in any measured step (not a median).
    """
    steps = run.get("steps") or []
    measured = steps[warmup:]
    summary: dict[str, Any] = {
        "framework": run.get("framework"), "setting": run.get("setting", {}).get("name"),
        "status": run.get("status", "unknown"), "error": run.get("error"),
        "steps_total": len(steps), "steps_measured": len(measured), "warmup": warmup,
        "kv_cache_tokens": run.get("kv_cache_tokens"),
        "weight_gib": (run.get("weights") or {}).get("unique_gib"),
        "init_s": run.get("init_s"),
    }
    if run.get("status") == "ok" and len(steps) <= warmup and steps:
        summary["status"] = "too few steps"
    for name in STEP_FIELDS:
        values = [s[name] for s in measured if name in s]
        summary[name] = statistics.median(values) if values else None
    rates = [s["generated_tokens"] / s["generate_s"] for s in measured
             if s.get("generate_s") and s.get("generated_tokens")]
    summary["generate_tok_s"] = statistics.median(rates) if rates else None
    peaks = [s["peak_device_gib"] for s in measured if s.get("peak_device_gib") is not None]
    summary["peak_device_gib"] = max(peaks) if peaks else None
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}×"


def _status_text(summary: dict[str, Any]) -> str:
    if summary["status"] == "ok":
        return "ok"
    error = (summary.get("error") or "").strip().splitlines()
    return f"{summary['status']}: {error[-1][:120]}" if error else summary["status"]


def step_table(summaries: list[dict[str, Any]]) -> str:
    """One markdown table: a row per framework × setting, then TRL / rlcore ratios per setting."""
    head = ("| setting | framework | step s (median) | generate s | weight sync s | sleep/wake s | train + rest s "
            "| generate tok/s | peak GPU GiB | GPU GiB of weights | KV cache tokens | status |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for s in summaries:
        lines.append("| " + " | ".join([
            _fmt(s["setting"]), LABELS.get(s["framework"], _fmt(s["framework"])), _fmt(s["step_s"]),
            _fmt(s["generate_s"]), _fmt(s["weight_sync_s"], 3), _fmt(s["standby_s"], 3), _fmt(s["train_and_rest_s"]),
            _fmt(s["generate_tok_s"], 0), _fmt(s["peak_device_gib"], 1), _fmt(s["weight_gib"], 2),
            _fmt(s["kv_cache_tokens"]), _status_text(s)]) + " |")
    comparison = ratios(summaries)
    if comparison:
        lines += ["", "| setting | TRL step / rlcore step | TRL peak / rlcore peak | TRL weights / rlcore weights |",
                  "| --- | --- | --- | --- |"]
        for name, r in comparison.items():
            lines.append(f"| {name} | {_times(r['step'])} | {_times(r['peak'])} | {_times(r['weights'])} |")
    return "\n".join(lines)


def ratios(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per setting where both frameworks ran: TRL's median step, peak memory and weight bytes over rlcore's."""
    by_key = {(s["setting"], s["framework"]): s for s in summaries}
    out = {}
    for setting in dict.fromkeys(s["setting"] for s in summaries):
        ours, theirs = by_key.get((setting, "rlcore")), by_key.get((setting, "trl"))
        if ours is None or theirs is None:
            continue
        out[setting] = {"step": ratio(theirs["step_s"], ours["step_s"]),
                        "peak": ratio(theirs["peak_device_gib"], ours["peak_device_gib"]),
                        "weights": ratio(theirs["weight_gib"], ours["weight_gib"])}
    return out


# ---------------------------------------------------------------------- longest completion
@dataclass
class SearchResult:
    """What a bounded search found: the longest length that passed, the shortest that failed above it."""

    longest_ok: int | None
    first_failure: int | None
    failure_outcome: str | None
    probes: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""


def bounded_search(probe: Callable[[int], dict[str, Any]], start: int, maximum: int, granularity: int,
                   max_probes: int, can_probe: Callable[[int], bool] = lambda length: True) -> SearchResult:
    """Longest completion length that passes ``probe``, with at most ``max_probes`` probes.

    Doubles from ``start`` (the last try is ``maximum``) until a probe fails, then bisects between the longest
    pass and the shortest failure on multiples of ``granularity``. ``probe(length)`` returns a record with
    ``outcome`` in ``ok`` / ``oom`` / ``timeout`` / ``error``; anything but ``ok`` counts as a failure for the
    search, and an ``error`` (not a memory limit) stops it, since a broken run says nothing about memory.
    ``can_probe(length)`` is asked before each probe (a time budget).
    """
    if not (0 < granularity <= start <= maximum) or max_probes < 1:
        raise ValueError(f"bounded_search: need 0 < granularity ({granularity}) <= start ({start}) <= maximum "
                         f"({maximum}) and max_probes ({max_probes}) >= 1")
    best, failed, failed_outcome = None, None, None
    probes: list[dict[str, Any]] = []

    def run(length: int) -> str | None:
        if len(probes) >= max_probes:
            return None
        if not can_probe(length):
            return None
        record = dict(probe(length))
        record.setdefault("length", length)
        probes.append(record)
        return record.get("outcome", "error")

    length, stopped = start, ""
    while True:  # grow
        outcome = run(length)
        if outcome is None:
            stopped = "probe limit or time budget"
            break
        if outcome != "ok":
            failed, failed_outcome = length, outcome
            if outcome == "error":
                stopped = f"error at {length}"
            break
        best = length
        if length >= maximum:
            stopped = f"reached the maximum ({maximum})"
            break
        length = min(length * 2, maximum)
    while failed is not None and not stopped:  # bisect between best (or 0) and failed
        low = best or 0
        middle = (low + failed) // 2 // granularity * granularity
        if middle <= low or failed - low <= granularity:
            stopped = f"resolved to {granularity}"
            break
        outcome = run(middle)
        if outcome is None:
            stopped = "probe limit or time budget"
            break
        if outcome == "ok":
            best = middle
        else:
            failed, failed_outcome = middle, outcome
            if outcome == "error":
                stopped = f"error at {middle}"
    return SearchResult(best, failed, failed_outcome, probes, stopped)


def train_phase_peak(phase_peaks: dict[str, float] | None) -> float | None:
    """The largest device-memory peak over the training labels (:data:`TRAINING_PHASES`) of a
    ``{label: GiB}`` map; None when none of them was sampled."""
    values = [peak for label, peak in (phase_peaks or {}).items() if label in TRAINING_PHASES and peak is not None]
    return max(values) if values else None


def memory_estimate(probes: list[dict[str, Any]], device_total_gib: float | None = None,
                    margin_gib: float = MEMORY_MARGIN_GIB) -> dict[str, Any]:
    """Completion length at which the training-phase peak would reach the device, from passing probes.

    Least squares over the passing probes' points ``(L_i, p_i)`` (``length``, ``train_phase_peak_gib``)::

        b = Σ (L_i − L̄)(p_i − p̄) / Σ (L_i − L̄)²,   a = p̄ − b·L̄,   L* = ⌊(T − m − a) / b⌋

    with ``T`` the device total (``device_total_gib``, else the smallest the probes recorded) and ``m`` the
    margin. An estimate, not a run: it assumes the peak stays linear in L (gradient checkpointing keeps one
    layer's activations, and attention, logits and the saved layer inputs are each O(L)) and says nothing about
    time. Returns ``length`` (None when it can not be estimated, with ``reason``), ``intercept_gib`` (a),
    ``slope_gib_per_token`` (b), ``limit_gib`` (T − m), the lengths used and the largest fit residual.
    """
    points = [(int(p["length"]), float(p["train_phase_peak_gib"])) for p in probes
              if p.get("outcome") == "ok" and p.get("train_phase_peak_gib") is not None]
    totals = [float(p["device_total_gib"]) for p in probes if p.get("device_total_gib")]
    total = device_total_gib if device_total_gib is not None else (min(totals) if totals else None)
    lengths = sorted({length for length, _ in points})
    out: dict[str, Any] = {"length": None, "reason": None, "intercept_gib": None, "slope_gib_per_token": None,
                           "device_total_gib": total, "margin_gib": margin_gib,
                           "limit_gib": None if total is None else total - margin_gib,
                           "lengths": lengths, "points": len(points), "max_residual_gib": None}
    if len(lengths) < 2:
        out["reason"] = ("no passing probe recorded a training-phase peak" if not lengths else
                         f"training-phase peaks at one length only ({lengths[0]:,}): a line needs two")
        return out
    mean_length = sum(length for length, _ in points) / len(points)
    mean_peak = sum(peak for _, peak in points) / len(points)
    spread = sum((length - mean_length) ** 2 for length, _ in points)
    slope = sum((length - mean_length) * (peak - mean_peak) for length, peak in points) / spread
    intercept = mean_peak - slope * mean_length
    out.update(intercept_gib=intercept, slope_gib_per_token=slope,
               max_residual_gib=max(abs(peak - intercept - slope * length) for length, peak in points))
    if total is None:
        out["reason"] = "the device total was not recorded"
    elif slope <= 0:
        out["reason"] = f"the training-phase peak does not grow with the length (slope {slope * 1000:.3g} GiB per 1k)"
    elif intercept >= out["limit_gib"]:
        out["reason"] = f"the fitted peak is above {out['limit_gib']:.1f} GiB at any length"
    else:
        out["length"] = math.floor((out["limit_gib"] - intercept) / slope)
    return out


def longest_from_probes(probes: list[dict[str, Any]], margin_gib: float = MEMORY_MARGIN_GIB) -> dict[str, Any]:
    """The longest passing length and the shortest failing length above it, from probes of any number of runs;
    the completions per probe, each passing length's training-phase peak and :func:`memory_estimate`."""
    passed = [p["length"] for p in probes if p.get("outcome") == "ok"]
    longest = max(passed) if passed else None
    above = sorted((p for p in probes if p.get("outcome") != "ok" and (longest is None or p["length"] > longest)),
                   key=lambda p: p["length"])
    first = above[0] if above else None
    peaks: dict[int, float] = {}
    for p in probes:
        if p.get("outcome") == "ok" and p.get("train_phase_peak_gib") is not None:
            peaks[p["length"]] = max(peaks.get(p["length"], 0.0), p["train_phase_peak_gib"])
    return {"longest_ok": longest, "first_failure": first["length"] if first else None,
            "failure_outcome": first.get("outcome") if first else None,
            "failure_error": first.get("error") if first else None,
            "probes": sorted((p["length"], p.get("outcome")) for p in probes),
            "num_generations": sorted({p["num_generations"] for p in probes if p.get("num_generations")}),
            "train_phase_peaks_gib": sorted(peaks.items()),
            "memory_estimate": memory_estimate(probes, margin_gib=margin_gib)}


def _estimate_text(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "–"
    if estimate.get("length") is None:
        return f"– ({estimate.get('reason')})"
    text = (f"≈ {estimate['length']:,} (peak ≈ {estimate['intercept_gib']:.1f} GiB + "
            f"{estimate['slope_gib_per_token'] * 1000:.3f} GiB per 1k tokens reaches {estimate['limit_gib']:.1f} "
            f"GiB; {len(estimate['lengths'])} lengths")
    if estimate.get("max_residual_gib") is not None and estimate["points"] > 2:
        text += f", residual ≤ {estimate['max_residual_gib']:.2f} GiB"
    return text + ")"


def longest_table(longest: dict[str, dict[str, Any]], kv_bounds: dict[str, int | None] | None = None) -> str:
    """Markdown: per framework, the longest completion that trained, the first failure, the completions per
    probe, the training-phase peaks, the length estimated from them (:func:`memory_estimate`) and the
    KV-cache bound; then notes on what each column is."""
    head = ("| framework | longest completion that trained | first failure above it | probes (length: outcome) "
            "| completions per probe | training-phase peak GiB (length: peak) "
            "| longest estimated from the training-phase peak (ESTIMATE: linear fit, not a run) "
            "| 8 completions fit in KV cache up to |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    margins = set()
    for framework, found in longest.items():
        failure = "–"
        if found.get("first_failure") is not None:
            error = (found.get("failure_error") or "").strip().splitlines()
            failure = f"{found['first_failure']:,} ({found.get('failure_outcome')}"
            failure += f": {error[-1][:80]})" if error else ")"
        probes = ", ".join(f"{length:,}: {outcome}" for length, outcome in found.get("probes", []))
        generations = ", ".join(str(n) for n in found.get("num_generations") or []) or "–"
        peaks = ", ".join(f"{length:,}: {peak:.1f}" for length, peak in found.get("train_phase_peaks_gib") or [])
        estimate = found.get("memory_estimate")
        if estimate:
            margins.add(estimate.get("margin_gib"))
        bound = (kv_bounds or {}).get(framework)
        lines.append(f"| {LABELS.get(framework, framework)} | {_fmt(found.get('longest_ok'))} | {failure} | "
                     f"{probes or '–'} | {generations} | {peaks or '–'} | {_estimate_text(estimate)} | "
                     f"{_fmt(bound)} |")
    margin = ", ".join(f"{m:g}" for m in sorted(m for m in margins if m is not None)) or f"{MEMORY_MARGIN_GIB:g}"
    lines += ["", ("A probe is one optimizer step at 1 prompt × N completions (the column above; the benchmark's "
                   "setting is 8) × L tokens, one sequence per micro-batch, synthetic completions. The training-phase "
                   "peak is the device memory in use (NVML) during the no-grad log-prob pass and forward + backward; "
                   "with one sequence per micro-batch it hardly depends on N, while the log-prob pass time is "
                   "proportional to N. The estimate is a least-squares line through those peaks at two or more "
                   f"passing lengths, extended to the device total minus {margin} GiB: memory only, not time, and "
                   "not a measured pass.")]
    return "\n".join(lines)


def kv_bound(kv_cache_tokens: int | None, prompt_length: int, num_generations: int = 8) -> int | None:
    """Longest completion for which a whole group (``num_generations`` sequences) fits in the KV cache at once:
    ``kv_cache_tokens // num_generations - prompt_length`` (vLLM can go further by running fewer at a time)."""
    if not kv_cache_tokens:
        return None
    return max(0, kv_cache_tokens // num_generations - prompt_length)

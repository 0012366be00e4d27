"""Summaries, the side-by-side markdown tables and the bounded longest-completion search of ``vs_trl.py``.

Pure functions over the JSON records the framework processes write, so they run (and are tested) on a CPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FRAMEWORKS = ("rlcore", "trl")
LABELS = {"rlcore": "rlcore", "trl": "TRL 1.16 colocate"}
STEP_FIELDS = ("step_s", "generate_s", "weight_sync_s", "standby_s", "train_and_rest_s")


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


def longest_from_probes(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The longest passing length and the shortest failing length above it, from probes of any number of runs."""
    passed = [p["length"] for p in probes if p.get("outcome") == "ok"]
    longest = max(passed) if passed else None
    above = sorted((p for p in probes if p.get("outcome") != "ok" and (longest is None or p["length"] > longest)),
                   key=lambda p: p["length"])
    first = above[0] if above else None
    return {"longest_ok": longest, "first_failure": first["length"] if first else None,
            "failure_outcome": first.get("outcome") if first else None,
            "failure_error": first.get("error") if first else None,
            "probes": sorted((p["length"], p.get("outcome")) for p in probes)}


def longest_table(longest: dict[str, dict[str, Any]], kv_bounds: dict[str, int | None] | None = None) -> str:
    """Markdown: per framework, the longest completion that trained, the first failure, and the KV-cache bound."""
    head = ("| framework | longest completion that trained | first failure above it | probes (length: outcome) "
            "| 8 completions fit in KV cache up to |")
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for framework, found in longest.items():
        failure = "–"
        if found.get("first_failure") is not None:
            error = (found.get("failure_error") or "").strip().splitlines()
            failure = f"{found['first_failure']:,} ({found.get('failure_outcome')}"
            failure += f": {error[-1][:80]})" if error else ")"
        probes = ", ".join(f"{length:,}: {outcome}" for length, outcome in found.get("probes", []))
        bound = (kv_bounds or {}).get(framework)
        lines.append(f"| {LABELS.get(framework, framework)} | {_fmt(found.get('longest_ok'))} | {failure} | "
                     f"{probes or '–'} | {_fmt(bound)} |")
    return "\n".join(lines)


def kv_bound(kv_cache_tokens: int | None, prompt_length: int, num_generations: int = 8) -> int | None:
    """Longest completion for which a whole group (``num_generations`` sequences) fits in the KV cache at once:
    ``kv_cache_tokens // num_generations - prompt_length`` (vLLM can go further by running fewer at a time)."""
    if not kv_cache_tokens:
        return None
    return max(0, kv_cache_tokens // num_generations - prompt_length)

"""Where a model comes from (the tiny preset, a local directory, the Hugging Face cache, or the Hub), decided
without importing torch or transformers, so that a wrong name or a missing network fails at once."""

from __future__ import annotations

import os


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says how to point at a local copy."""


def resolve_model_path(name_or_path: str) -> str:
    """``"tiny"`` → the tiny random Llama-3 preset (built on first use); a local directory or a Hub id unchanged.

    A name that can only be a file-system path (absolute, ``./``, ``~``, or more than one ``/``) and is not a
    directory raises :class:`ModelLoadError` saying so, instead of being tried as a Hub id.
    """
    if name_or_path == "tiny":
        from rlcore.tiny_model import build_tiny_model

        return build_tiny_model()
    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelLoadError(f"model_name_or_path={name_or_path!r}: no such directory (expected a local model "
                             "directory with config.json, weights and tokenizer files, a Hub id such as "
                             "meta-llama/Meta-Llama-3-8B-Instruct, or 'tiny')")
    return os.path.expanduser(name_or_path)


def model_source(name_or_path: str) -> str:
    """Where the model comes from, without loading anything: ``"tiny"``, ``"local"`` (a directory), ``"cached"``
    (a Hub id already in the Hugging Face cache) or ``"hub"`` (needs a download). Raises
    :class:`ModelLoadError` for a path that is not a directory."""
    if name_or_path == "tiny":
        return "tiny"
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return "local"
    resolve_model_path(name_or_path)  # raises "no such directory" for what can only be a path
    return "cached" if in_hub_cache(name_or_path) else "hub"


def in_hub_cache(repo_id: str) -> bool:
    """Whether a snapshot of Hub model ``repo_id`` with a config.json is in the Hugging Face cache (the
    documented ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` layout; huggingface_hub is not imported)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    snapshots = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(snapshots) and any(os.path.isfile(os.path.join(snapshots, name, "config.json"))
                                            for name in os.listdir(snapshots))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub answers within ``timeout`` seconds, else why not (one line).

    ``HF_HUB_OFFLINE`` set counts as unreachable. The probe is one HEAD request to ``$HF_ENDPOINT`` (proxies
    from the environment apply), in a thread so that a hanging name lookup can not hold the caller longer.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    import threading
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered
        except Exception as error:  # noqa: BLE001 - any failure to connect means "not reachable"
            reason = getattr(error, "reason", error)
            outcome.append(f"{endpoint}: {reason}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"{endpoint}: no answer within {timeout:g} s"


def checkpoint_quantization_config(path: str) -> dict | None:
    """The ``quantization_config`` of a local model directory's config.json (a dict; ``{"quant_method":
    "unknown"}`` when it is not one), or None for a 16-bit checkpoint, a Hub id or a directory without
    config.json."""
    import json

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None  # transformers reports an unreadable config.json when it loads the model
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not quantization:
        return None
    return quantization if isinstance(quantization, dict) else {"quant_method": "unknown"}


def checkpoint_quantization(path: str) -> str | None:
    """The ``quantization_config.quant_method`` of a local model directory's config.json (e.g. ``"fp8"``,
    ``"compressed-tensors"``), or None for a 16-bit checkpoint, a Hub id or a directory without config.json."""
    quantization = checkpoint_quantization_config(path)
    return None if quantization is None else str(quantization.get("quant_method", "unknown"))


def fp8_checkpoint_format(path: str) -> dict | None:
    """The ``quantization_config`` of a per-tensor FP8 checkpoint with dynamic activation scales (``quant_method
    "fp8"``, ``activation_scheme "dynamic"``, no ``weight_block_size``: the format
    :mod:`rlcore.fp8_checkpoint` writes), or None when ``path`` is not pre-quantized.

    Raises :class:`ModelLoadError` naming the field for every other quantization: other FP8 variants (static
    activation scales, block scales) and other methods (compressed-tensors, awq, gptq, bitsandbytes, ...).
    """
    quantization = checkpoint_quantization_config(path)
    if quantization is None:
        return None
    method = str(quantization.get("quant_method", "unknown"))
    if method != "fp8":
        raise ModelLoadError(
            f"model_name_or_path={path!r} is a pre-quantized checkpoint (config.json quantization_config."
            f"quant_method={method!r}); rlcore trains from 16-bit checkpoints and from per-tensor FP8 ones "
            "(quant_method='fp8') only. Give the bf16 or fp16 checkpoint: with dtype='float8' vLLM quantizes it to "
            "FP8 as it loads it, and the trainer shares those FP8 weights.")
    scheme = quantization.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ModelLoadError(
            f"model_name_or_path={path!r}: config.json quantization_config.activation_scheme={scheme!r} is not "
            "supported: vLLM would quantize activations with the checkpoint's static input scales while the "
            "trainer quantizes them per token, so training and generation would compute different models. Use a "
            "checkpoint with activation_scheme='dynamic', or the 16-bit one with dtype='float8'.")
    if quantization.get("weight_block_size") is not None:
        raise ModelLoadError(
            f"model_name_or_path={path!r}: config.json quantization_config.weight_block_size="
            f"{quantization['weight_block_size']!r} (block-quantized FP8) is not supported: rlcore's FP8 layers take "
            "one scale per weight tensor. Give the 16-bit checkpoint with dtype='float8' (vLLM quantizes it per "
            "tensor), or write a per-tensor one with python -m rlcore.fp8_checkpoint SOURCE TARGET.")
    return quantization


def check_checkpoint_precision(path: str, dtype: str) -> None:
    """Raises :class:`ModelLoadError` for a checkpoint that ``dtype`` can not train on with one copy of the
    weights: any pre-quantized checkpoint other than per-tensor FP8 (:func:`fp8_checkpoint_format`), and a
    per-tensor FP8 one with a 16-bit ``dtype`` (it trains with ``dtype="float8"``)."""
    if fp8_checkpoint_format(path) is not None and dtype != "float8":
        raise ModelLoadError(
            f"model_name_or_path={path!r} is a pre-quantized checkpoint (config.json quantization_config."
            f"quant_method='fp8'), and dtype={dtype!r}; set dtype='float8' (load_in_fp8=True) to train on its FP8 "
            "weights, or give the 16-bit checkpoint for bfloat16/float16.")


def looks_like_local_path(name_or_path: str) -> bool:
    """True for names a Hub id can not be (``org/name`` has one ``/`` and no leading ``/``, ``.`` or ``~``)."""
    return (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
            or os.path.isdir(name_or_path))

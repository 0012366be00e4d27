"""Per-token log-probabilities of completions under the policy, without [tokens × vocab] logits at once."""

from __future__ import annotations

import torch

from rlcore.kernels.selective_logprobs import selective_log_softmax


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(logits_t / temperature)[token_{t+1}]`` for the last ``completion_length`` tokens.

    ``input_ids`` is [B, L] = left-padded prompt ‖ right-padded completion. Returns [B, completion_length]
    (and the per-token entropy of the same distributions when ``return_entropy``). The decoder runs once; the
    lm_head is applied in chunks of tokens by :func:`rlcore.kernels.selective_log_softmax`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    # Positions count real tokens only, as generation does with a left-padded prompt.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    # hidden state t predicts token t+1: the states before each completion token
    hidden = hidden[:, -completion_length - 1:-1, :]
    targets = input_ids[:, -completion_length:]
    batch, length, width = hidden.shape
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise TypeError(f"the output layer is a {type(head).__name__}; log-probs need a plain bias-free Linear "
                        "lm_head (LoRA on lm_head is not supported)")
    result = selective_log_softmax(hidden.reshape(-1, width), head.weight, targets.reshape(-1),
                                   temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy)
    if return_entropy:
        logps, entropy = result
        return logps.view(batch, length), entropy.view(batch, length)
    return result.view(batch, length)

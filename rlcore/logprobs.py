"""Per-token log-probabilities of completions under the policy, without [tokens × vocab] logits at once."""

from __future__ import annotations

import torch

from rlcore.kernels.apply import mask_free_packed_forward
from rlcore.kernels.packing import pack_padded, packed_positions
from rlcore.kernels.selective_logprobs import selective_log_softmax


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    packed: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(logits_t / temperature)[token_{t+1}]`` for the last ``completion_length`` tokens.

    ``input_ids`` is [B, L] = left-padded prompt ‖ right-padded completion. Returns [B, completion_length]
    (and the per-token entropy of the same distributions when ``return_entropy``). The decoder runs once; the
    lm_head is applied in chunks of tokens by :func:`rlcore.kernels.selective_log_softmax`.

    ``packed=True`` (``GRPOConfig.padding_free``) runs the decoder on one row holding only the real tokens
    (see :func:`packed_completion_logprobs`): same values at real completion positions, zeros at padded ones.
    """
    if packed:
        return packed_completion_logprobs(model, input_ids, attention_mask, completion_length, temperature,
                                          chunk_size, return_entropy)
    decoder, head = _decoder_and_head(model)
    # Positions count real tokens only, as generation does with a left-padded prompt.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    # hidden state t predicts token t+1: the states before each completion token
    hidden = hidden[:, -completion_length - 1:-1, :]
    targets = input_ids[:, -completion_length:]
    batch, length, width = hidden.shape
    result = selective_log_softmax(hidden.reshape(-1, width), head.weight, targets.reshape(-1),
                                   temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy)
    if return_entropy:
        logps, entropy = result
        return logps.view(batch, length), entropy.view(batch, length)
    return result.view(batch, length)


def packed_completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` without computing a pad token: same arguments, same [B, completion_length]
    result, zeros where the completion is padding (the loss masks those).

    The real tokens of every row (prompt then completion) are packed end to end into one row with positions
    restarting at 0 per sample (:func:`rlcore.kernels.pack_padded`); the decoder keeps attention inside each
    sample (HF's block-diagonal mask from the positions, or the varlen kernel that ``cu_seq_lens_q/k`` select
    when rlcore's kernels are applied on CUDA). The lm_head then runs only on the states that predict a real
    completion token.
    """
    decoder, head = _decoder_and_head(model)
    packed = pack_padded(input_ids, attention_mask)
    # flash=True: the varlen kwargs reach every attention module; SDPA/eager ignore them
    with mask_free_packed_forward(model):  # rlcore's attention reads cu_seqlens: no [T, T] mask needed
        hidden = decoder(**packed.model_kwargs(flash=True)).last_hidden_state[0]  # [T, H]
    batch = input_ids.shape[0]
    scored = attention_mask[:, -completion_length:].bool()  # the real completion tokens, [B, C]
    select = torch.zeros_like(attention_mask, dtype=torch.bool)
    select[:, -completion_length:] = scored
    where = packed_positions(packed, select)  # each scored token's place in the packed row
    if (packed.position_ids[0, where] == 0).any():
        # the first token of a sample has no state before it in its own sample to predict it from
        raise ValueError("padding_free needs at least one prompt token before every completion")
    targets = input_ids[:, -completion_length:][scored]
    result = selective_log_softmax(hidden[where - 1], head.weight, targets, temperature=temperature,
                                   chunk_size=chunk_size, return_entropy=return_entropy)
    slots = scored.reshape(-1).nonzero().squeeze(1)  # same row-major order as `where`

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # out of place, so gradients flow back to `values`
        out = values.new_zeros(batch * completion_length).index_copy(0, slots, values)
        return out.view(batch, completion_length)

    if return_entropy:
        logps, entropy = result
        return scatter(logps), scatter(entropy)
    return scatter(result)


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise TypeError(f"the output layer is a {type(head).__name__}; log-probs need a plain bias-free Linear "
                        "lm_head (LoRA on lm_head is not supported)")
    return decoder, head

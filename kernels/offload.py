"""Activation offload: tensors autograd saves go to pinned CPU memory and come back for backward.

``offload_activations()`` is a ``saved_tensors_hooks`` context. Copies to the host run on a side CUDA stream
(ordered after the producing kernels by an event), so the compute stream does not wait for PCIe; the
source block is kept alive for the side stream with ``record_stream``. Backward copies back on the current
stream after waiting for the host copy's event. Small tensors (< ``min_bytes``) and parameters stay put:
moving them costs more than it saves. Off by default; on CPU it does nothing unless ``force_cpu_roundtrip``
(used by tests to check the hooks give back exactly what they got).

With gradient checkpointing, what autograd saves outside the checkpointed blocks is essentially each
layer's input hidden state [B, L, H]; offloading those keeps GPU memory flat in the number of layers.
"""

from __future__ import annotations

from typing import Any

import torch


class offload_activations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: ``with offload_activations(): loss = model(...); loss.backward()``."""

    def __init__(self, enabled: bool = True, min_bytes: int = 1 << 20, force_cpu_roundtrip: bool = False) -> None:
        self.enabled = enabled
        self.min_bytes = min_bytes
        self.force_cpu_roundtrip = force_cpu_roundtrip
        self.offloaded_bytes = 0
        self.packed = 0
        self._stream: torch.cuda.Stream | None = None
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "offload_activations":
        super().__enter__()
        return self

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self.enabled or isinstance(tensor, torch.nn.Parameter):
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_cuda and nbytes >= self.min_bytes:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            tensor.record_stream(stream)
            self.offloaded_bytes += nbytes
            self.packed += 1
            return ("cuda", host, tensor.device, done, tensor.requires_grad)
        if self.force_cpu_roundtrip and tensor.device.type == "cpu" and nbytes >= self.min_bytes:
            self.packed += 1
            self.offloaded_bytes += nbytes
            return ("cpu", tensor.detach().clone(), tensor.device, None, tensor.requires_grad)
        return tensor

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        kind, host, device, done, _ = packed
        if kind == "cpu":
            return host
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)

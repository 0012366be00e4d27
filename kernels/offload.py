"""Activation offload: tensors autograd saves go to pinned CPU memory and come back for backward.

``offload_activations()`` is a ``saved_tensors_hooks`` context. Copies to the host run on a side CUDA stream
(ordered after the producing kernels by an event), so the compute stream does not wait for PCIe; the
source block is kept alive for the side stream with ``record_stream``. In backward, bringing tensor k back
also starts copying tensor k−1 (the one packed before it, which backward needs next) on the side stream, so
with gradient checkpointing the next layer's input is already on the GPU when its recomputation starts;
the compute stream only waits on an event. Small tensors (< ``min_bytes``) and parameters stay put: moving
them costs more than it saves. Off by default; on CPU it does nothing unless ``force_cpu_roundtrip`` (used
by tests to check the hooks give back exactly what they got).

With gradient checkpointing, what autograd saves outside the checkpointed blocks is essentially each
layer's input hidden state [B, L, H]; offloading those keeps GPU memory flat in the number of layers.
Pinned host blocks come from PyTorch's caching host allocator and are reused by the next step;
``release_host_cache()`` hands them back to the OS.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class _Offloaded:
    """One saved tensor living in pinned host memory, possibly already on its way back.

    Only the autograd graph holds it strongly: once backward has used it (or the graph is dropped) the pinned
    block returns to PyTorch's host cache for the next step. The link to the record packed before it is weak
    for the same reason.
    """

    __slots__ = ("host", "device", "to_host", "gpu", "to_gpu", "fetched", "previous", "stream", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, to_host: torch.cuda.Event,
                 stream: torch.cuda.Stream, previous: "weakref.ref[_Offloaded] | None") -> None:
        self.host, self.device, self.to_host, self.stream = host, device, to_host, stream
        self.previous = previous
        self.gpu: torch.Tensor | None = None
        self.to_gpu: torch.cuda.Event | None = None
        self.fetched = False

    def prefetch(self) -> None:
        if self.gpu is not None or self.fetched:
            return
        # allocated on the compute stream (which will use and free it), filled on the side stream
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        self.stream.wait_event(self.to_host)
        with torch.cuda.stream(self.stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.to_gpu = torch.cuda.Event()
            self.to_gpu.record(self.stream)

    def take(self) -> torch.Tensor:
        if self.gpu is None:  # not prefetched, or unpacked a second time (retain_graph)
            self.fetched = False
            self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.to_gpu)
        gpu, self.gpu, self.fetched = self.gpu, None, True
        previous = self.previous() if self.previous is not None else None
        if previous is not None:  # backward needs the one packed before next
            previous.prefetch()
        return gpu


class offload_activations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: ``with offload_activations(): loss = model(...)``; then ``loss.backward()`` anywhere.

    The hook object keeps no saved data (it sits in a reference cycle with its own bound-method hooks, so
    anything it held would live until the cyclic garbage collector ran): the graph owns every record.
    """

    def __init__(self, enabled: bool = True, min_bytes: int = 1 << 20, force_cpu_roundtrip: bool = False) -> None:
        self.enabled = enabled
        self.min_bytes = min_bytes
        self.force_cpu_roundtrip = force_cpu_roundtrip
        self.offloaded_bytes = 0
        self.packed = 0
        self._stream: torch.cuda.Stream | None = None
        self._last: weakref.ref[_Offloaded] | None = None
        super().__init__(self._pack, _unpack)

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
            record = _Offloaded(host, tensor.device, done, stream, self._last)
            self._last = weakref.ref(record)
            return record
        if self.force_cpu_roundtrip and tensor.device.type == "cpu" and nbytes >= self.min_bytes:
            self.packed += 1
            self.offloaded_bytes += nbytes
            return ("cpu", tensor.detach().clone())
        # detached: a saved output returned as itself would hold its own grad_fn (a cycle through C++ that
        # the garbage collector cannot see)
        return tensor.detach()


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Offloaded):
        return packed.take()
    if isinstance(packed, tuple):
        return packed[1]
    return packed


def release_host_cache() -> None:
    """Returns cached pinned host blocks to the OS (PyTorch keeps freed ones for reuse)."""
    from .torch_compat import release_pinned_host_cache

    release_pinned_host_cache()

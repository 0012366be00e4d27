"""Triton kernels for the training phase, each beside its pure-PyTorch reference."""

"""Sandboxed code execution and environments (2048, ...)."""

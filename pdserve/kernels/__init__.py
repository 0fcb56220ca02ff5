"""Triton kernels, one file each, each with its pure-torch reference (see the kernels issue)."""

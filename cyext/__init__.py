"""Compiled ternary and float kernels (Cython, nogil). Each kernel has a numpy reference in `reference`."""

"""Numba kernels. Importing a kernel module imports numba and compiles nothing.

Compiled kernels are cached in the user cache directory (`ternet.cachedir.numba_cache_dir()`),
never in this package's directory: `ternet.kernels._jit.kernel` gives every kernel a cache
locator of its own.
"""

"""`python -m ddl.kernels`: compile every kernel into numba's cache (`make install` runs it)."""
from ddl import kernels
from ddl.kernels import jit

kernels.setup()
with kernels.using("numba"):
    seconds = kernels.warm()
print(f"numba kernels ready in {seconds:.1f} s (cache: {jit.cache_dir()})")

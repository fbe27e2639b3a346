"""`python -m ddl.kernels`: compile every kernel into numba's cache (`make install` runs it)."""
from ddl.kernels import jit

seconds = jit.warm()
print(f"numba kernels ready in {seconds:.1f} s (cache: {jit.cache_dir()})")

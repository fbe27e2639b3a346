"""ddl: distributed data-parallel deep learning on NumPy and MPI."""

__version__ = "0.1.0"

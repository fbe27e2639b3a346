"""Prepare data/mnist.h5 from the raw IDX files: the same command as `ddl prepare`.

    python scripts/prepare_mnist.py --raw ../shared/data/mnist --out data/mnist.h5
"""
from ddl.cli import prepare

if __name__ == "__main__":
    prepare(prog_name="prepare_mnist.py")

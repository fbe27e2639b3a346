"""Write an MNIST-shaped data file of N training images (MNIST's own, repeated) with `ddl
prepare`'s writer, for measuring the loader on data larger than memory (docs/streaming.md):

    python scripts/big_mnist.py --images 2000000 --out /tmp/mnist-2m.h5

The test split is MNIST's. The file has the layout `ddl prepare` gives any set that size.
"""
import argparse

import numpy as np

from ddl import sources
from ddl.prepare import prepare


def tiled(split, n):
    """`split` (a ddl.sources.Split) repeated to n rows, streamed like any source."""
    base = np.concatenate(list(split.chunks(1 << 16)))

    def chunks(rows):
        for lo in range(0, n, rows):
            yield base[np.arange(lo, min(n, lo + rows)) % len(base)]
    return sources.Split(np.resize(split.labels, n), split.shape, chunks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, required=True, help="training images to write")
    parser.add_argument("--out", required=True)
    parser.add_argument("--raw", default="../shared/data/mnist", help="MNIST's IDX files")
    args = parser.parse_args()
    mnist = sources.idx(args.raw)
    mnist.splits["train"] = tiled(mnist.splits["train"], args.images)
    prepare(mnist, args.out)


if __name__ == "__main__":
    main()

"""Your own model on your own data, trained with ddl's pieces from Python:

    mpirun -n 2 python examples/custom_model.py data/colours.h5 [EPOCHS]

The file is a model file for `ddl train` too: `--model examples/custom_model.py:make_model`.
"""
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from ddl import nn
from ddl.comm import world
from ddl.data import DistributedSampler, H5Dataset, Loader
from ddl.optim import SGD
from ddl.parallel import Replicas
from ddl.evaluation import eval_loader, evaluate


def make_model(in_shape, num_classes, seed=0):
    """A small residual network for images (C, H, W) of any size."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False, rng=rng),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.ResidualBlock(16, 32, 2, rng=rng),
                         nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(32, num_classes, rng=rng))


if __name__ == "__main__":
    threadpool_limits(1)                              # one BLAS thread per rank
    comm, epochs = world(), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    train, test = H5Dataset(sys.argv[1], "train"), H5Dataset(sys.argv[1], "test")
    model = make_model(train.image_shape, train.num_classes)
    replicas = Replicas(model, comm)                  # one flat buffer; rank 0's weights everywhere
    optimizer, criterion = SGD(model.parameters(), lr=0.05, momentum=0.9), nn.CrossEntropyLoss()
    loader = Loader(train, DistributedSampler(train.n, comm.size, comm.rank, 32 * comm.size))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:                           # this rank's shard of each global batch
            replicas.zero_grad()
            loss = criterion(model(x), y)
            model.backward(criterion.backward())
            replicas.allreduce_grads(loss)            # average the gradients over the ranks
            model.step(optimizer)
        replicas.average_buffers()                    # and BatchNorm's running statistics
        loss, accuracy = evaluate(model, eval_loader(test, comm), comm)
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: test loss {loss:.4f}, accuracy {100 * accuracy:.2f}%")

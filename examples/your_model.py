"""A model file for `ddl train --model examples/your_model.py:make_model`: every layer ddl has,
each with its constructor's arguments spelled out (docs/your-project.md lists them).

    ddl summary --model examples/your_model.py:make_model --data data/colours.h5
    ddl train --model examples/your_model.py:make_model --data data/colours.h5 --checkpoint c.h5

`make_model(in_shape, num_classes, seed)` is called with the training images' shape (C, H, W)
and their number of classes; `seed` (optional) is `--seed`, so that every rank builds the same
initial weights (ddl also broadcasts rank 0's). It returns an nn.Module whose forward maps images
(N, C, H, W) float32 to logits (N, num_classes).
"""
import numpy as np

from ddl import nn


def make_model(in_shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)     # every layer with weights draws them from it, in order
    channels, height, width = in_shape
    # Each 2x2 max pool halves the height and width (rounding down): what the Linear layer gets.
    features = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        # Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, rng=None)
        nn.Conv2d(channels, 16, kernel_size=3, stride=1, padding=1, bias=False, rng=rng),
        # BatchNorm2d(num_features, eps=1e-5, momentum=0.1): running statistics for eval mode
        nn.BatchNorm2d(16, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        # MaxPool2d(kernel_size, stride=None): stride defaults to kernel_size
        nn.MaxPool2d(kernel_size=2),
        # ResidualBlock(in_channels, out_channels, stride=1, rng=None): two 3x3 convolutions with
        # batch norm, plus the input (a 1x1 convolution when the shape changes)
        nn.ResidualBlock(16, 32, stride=1, rng=rng),
        # LeakyReLU(negative_slope=0.01); also nn.Tanh(), nn.Sigmoid()
        nn.LeakyReLU(negative_slope=0.01),
        # AvgPool2d(kernel_size, stride=None); nn.GlobalAvgPool2d() averages each channel whole
        nn.AvgPool2d(kernel_size=2),
        # Flatten(): (N, C, H, W) -> (N, C*H*W)
        nn.Flatten(),
        # Dropout(p=0.5, rng=None): only in training mode; ddl seeds it per rank and step
        nn.Dropout(p=0.25),
        # Linear(in_features, out_features, bias=True, rng=None)
        nn.Linear(features, 64, bias=True, rng=rng),
        nn.ReLU(),
        nn.Linear(64, num_classes, rng=rng),
    )

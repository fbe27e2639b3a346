"""The module paradigm: `ddl.nn.<Layer>` and `ddl.nn.<Loss>`."""
from ddl.nn.module import Module, Parameter, Residual, Sequential
from ddl.nn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d,
                           LeakyReLU, Linear, MaxPool2d, ReLU, ResidualBlock, Sigmoid, Tanh)
from ddl.nn.loss import CrossEntropyLoss, MSELoss

__all__ = ["Module", "Parameter", "Sequential", "Residual", "Linear", "Conv2d", "MaxPool2d",
           "AvgPool2d", "GlobalAvgPool2d", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Flatten",
           "Dropout", "BatchNorm2d", "ResidualBlock", "CrossEntropyLoss", "MSELoss"]

"""The module paradigm: `ddl.nn.<Layer>` and `ddl.nn.<Loss>`."""
from ddl.nn.module import Module, Parameter, Sequential
from ddl.nn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, LeakyReLU, Linear,
                           MaxPool2d, ReLU, Sigmoid, Tanh)
from ddl.nn.loss import CrossEntropyLoss, MSELoss

__all__ = ["Module", "Parameter", "Sequential", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d",
           "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Flatten", "Dropout", "BatchNorm2d",
           "CrossEntropyLoss", "MSELoss"]

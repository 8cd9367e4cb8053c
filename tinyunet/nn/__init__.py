"""Hand-written layers with manual backprop, in the order the lessons introduce them."""
from tinyunet.nn.module import Module, Parameter
from tinyunet.nn.conv import Conv2d
from tinyunet.nn.pool import MaxPool2d
from tinyunet.nn.upconv import ConvTranspose2d
from tinyunet.nn.concat import Concat
from tinyunet.nn.activation import ReLU
from tinyunet.nn.norm import BatchNorm2d
from tinyunet.nn.container import Sequential
# the layers of the U-Net variants (ResUNet, Attention U-Net)
from tinyunet.nn.add import Add
from tinyunet.nn.multiply import Multiply
from tinyunet.nn.sigmoid import Sigmoid
from tinyunet.nn.upsample import Upsample

__all__ = ["Module", "Parameter", "Conv2d", "MaxPool2d", "ConvTranspose2d", "Concat", "ReLU",
           "BatchNorm2d", "Sequential",
           "Add", "Multiply", "Sigmoid", "Upsample"]

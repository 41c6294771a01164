"""Building blocks: SLaK's large-kernel conv, its reparameterization, the depthwise conv operator and
the fast pointwise Linear."""
from slaknet.layers.dwconv import depthwise_conv2d
from slaknet.layers.large_kernel import ConvBN, DepthwiseConv2d, LargeKernelConv, fuse_conv_bn
from slaknet.layers.pointwise import Linear, linear
from slaknet.layers.norm import LayerNorm2d

__all__ = ["depthwise_conv2d", "ConvBN", "DepthwiseConv2d", "LargeKernelConv", "fuse_conv_bn", "LayerNorm2d",
           "Linear", "linear"]

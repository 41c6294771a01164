"""Building blocks: SLaK's large-kernel conv, its reparameterization, the depthwise conv operator and
the fast pointwise Linear, the block's MLP half (fused and cache-chunked for CPU inference: `block_mlp`),
the dense Conv2d of the stem and downsampling layers."""
from slaknet.layers.conv import Conv2d
from slaknet.layers.dwconv import depthwise_conv2d
from slaknet.layers.large_kernel import ConvBN, DepthwiseConv2d, LargeKernelConv, fuse_conv_bn
from slaknet.layers.pointwise import Linear, linear
from slaknet.layers.norm import LayerNorm2d

__all__ = ["Conv2d", "depthwise_conv2d", "ConvBN", "DepthwiseConv2d", "LargeKernelConv", "fuse_conv_bn", "LayerNorm2d",
           "Linear", "linear"]

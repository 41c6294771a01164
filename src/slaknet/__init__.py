"""slaknet: Sparse Large Kernel Networks (SLaK, ICLR 2023) as a library."""
__version__ = "0.1.0"

"""stnbench: distorted-MNIST benchmarks of Spatial Transformer Networks."""

__version__ = "0.1.0"

"""vidtrain: training long autoregressive video diffusion models across many GPUs."""

__version__ = "0.1.0"

"""Numeric formats as reference math (a leaf room): the kernels in vidtrain.kernels are checked
against it, and vidtrain.quant builds fake-quant training and caches on both."""

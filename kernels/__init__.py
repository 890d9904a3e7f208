"""Part of vidtrain (installed as vidtrain.kernels)."""

"""Part of vidtrain (installed as vidtrain.data_tools)."""

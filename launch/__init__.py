"""Part of vidtrain (installed as vidtrain.launch)."""

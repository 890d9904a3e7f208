"""NVFP4 quantization: the format (reference math), QAT `convert(model)`, KV fake-quant."""

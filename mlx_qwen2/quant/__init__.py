"""Quantization: affine grouped quantization, mixed recipes, GPTQ, and the one dequantize helper."""

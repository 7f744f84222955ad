"""slim-edge: extreme (2-bit, 1.25-bit) quantization of LLMs for edge devices."""
__version__ = "0.1.0"

"""smolbox: DPO fine-tuning of SmolVLM, taken all the way to an ONNX Runtime service."""

__version__ = "0.1.0"

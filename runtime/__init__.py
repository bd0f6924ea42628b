"""The real side (PyTorch): model loading, routing capture, the INT4 quantizer, the small-model trainer.

Submodules import torch and transformers; ``import runtime`` alone stays light. Main entry points:

- ``runtime.models.load_model(source, layers=..., dtype=..., device=...)`` -> ``LoadedModel``
- ``runtime.capture.capture(loaded, prompts, CaptureSettings(...))`` -> ``traces.Trace``
- ``python -m runtime.capture model=... out=trace.parquet`` (Hydra, conf/capture.yaml)
- ``runtime.quant.quantize`` / ``runtime.quant.Draft`` (INT4 weight-only group quantization)
- ``python -m runtime.train_small_moe`` (the project's own small MoE)
"""

__all__ = ["capture", "models", "prompts", "quant", "routing"]

"""Everything torch: model adapters, the pruning math, PyTorch references and tracing to ONNX."""

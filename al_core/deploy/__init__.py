"""Deployment: ONNX export and inference settings, the model registry, and whole-slide inference."""

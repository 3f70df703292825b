"""The FastAPI retrieval service: ONNX Runtime encoders, the index, metrics and the CLI. No torch."""

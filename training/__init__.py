"""Training: data readers, the frozen teacher, losses, the loop, evaluation and ONNX export.

The only package that touches datasets and teachers; it uses `model/` as a library."""

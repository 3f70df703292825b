"""What every path that turns an image or a query into vectors shares: the model card, the
tokenizer, image decoding and preprocessing, the ONNX Runtime encoders, and `ingest` (how an image
gets in). HTTP (service/), the CLI, the Ray bulk indexer, `emkum eval` and training's data readers
all call it; it imports neither torch, nor training, nor the service."""

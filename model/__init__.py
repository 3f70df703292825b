"""The EMKUM network as a library: building blocks, encoders, the assembled model, CMLI scoring
and offline pretrained loaders. Knows nothing of training loops, indexes or serving."""

from model.config import EmkumConfig, TextConfig, VisionConfig, load_config
from model.emkum import Emkum, ImageOutput, TextOutput

__all__ = ["Emkum", "EmkumConfig", "ImageOutput", "TextConfig", "TextOutput", "VisionConfig", "load_config"]

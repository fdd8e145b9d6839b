"""Model file formats: GGUF reading and the ggml block quantization layouts."""

from .gguf_model import GGUFModel, ModelConfig, ModelFileError, Tensor, load_metadata, load_model
from .quant import QK, QType

__all__ = ["GGUFModel", "ModelConfig", "ModelFileError", "QK", "QType", "Tensor", "load_metadata", "load_model"]

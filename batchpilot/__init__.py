"""batchpilot: plan, train and run LLMs around the batch."""

from batchpilot.model.hf import load_model, save_model
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model

__all__ = ["PRESETS", "Llama", "LlamaConfig", "build_model", "load_model", "save_model"]
__version__ = "0.1.0"

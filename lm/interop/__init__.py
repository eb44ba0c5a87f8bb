"""Weights in other libraries' formats: Hugging Face GPT-2 and Llama directories (`lm.interop.hf`)."""

from lm.interop.hf import (HF_PREFIX, HFError, check_weights, export, hf_directory, load_model, load_params,
                           load_sharded_params, model_config, model_fields, place_params, read_tokenizer,
                           write_tokenizer)
from lm.interop.hf_layout import export_layout

__all__ = ["HFError", "HF_PREFIX", "check_weights", "export", "export_layout", "hf_directory", "load_model",
           "load_params", "load_sharded_params", "model_config", "model_fields", "place_params", "read_tokenizer",
           "write_tokenizer"]

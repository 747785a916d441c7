"""Model families the decoder runs, by transformers model_type."""
from .deepseek_v2 import DeepseekV2ForCausalLM
from .gemma2 import Gemma2ForCausalLM
from .llama import LlamaForCausalLM

MODEL_CLASSES = {t: cls for cls in (LlamaForCausalLM, Gemma2ForCausalLM, DeepseekV2ForCausalLM) for t in cls.model_types}


def model_class(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        raise NotImplementedError(f"model_type {model_type!r} is not supported by the decoder; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type]

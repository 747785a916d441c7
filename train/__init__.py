"""SPCT training: sft, rft, grpo and meta-rm stages on one engine (plain PyTorch or DeepSpeed).

    from grm_engine.train import train
    result = train("sft", {"model": "base_dir", "data": "rows.jsonl", "output_dir": "out", "max_steps": 100})
    result.model_dir   # out/final: loads in GRM.from_pretrained / Decoder.from_pretrained as is

The same stages run from the command line: `grm-engine train STAGE --config FILE.yaml --key value ...`.
"""
from .api import train
from .config import STAGES, ConfigError, GRPOConfig, MetaRMConfig, RFTConfig, SFTConfig, TrainConfig, load_config
from .loop import TrainResult
from .bench_hooks import sft_bench_init, sft_bench_step

__all__ = ["train", "TrainResult", "load_config", "ConfigError", "STAGES", "TrainConfig", "SFTConfig", "RFTConfig",
           "MetaRMConfig", "GRPOConfig", "sft_bench_init", "sft_bench_step"]

"""train(stage, config): the one entry point the CLI, the demo and the tests call."""
from __future__ import annotations

from .config import TrainConfig, load_config


def run_stage(stage: str, config: TrainConfig, log=print):
    if stage == "sft":
        from .sft import run_sft

        return run_sft(config, log=log)
    if stage == "rft":
        from .rft import run_rft

        return run_rft(config, log=log)
    if stage == "meta-rm":
        from .meta_rm import run_meta_rm

        return run_meta_rm(config, log=log)
    from .grpo import run_grpo

    return run_grpo(config, log=log)


def train(stage: str, config: dict | TrainConfig | None = None, *, config_file: str | None = None, log=print):
    """Run one training stage -> TrainResult. config: a dict of keys (as in the YAML file) or a config object."""
    if not isinstance(config, TrainConfig):
        config = load_config(stage, config_file, dict(config or {}))
    return run_stage(stage, config, log=log)

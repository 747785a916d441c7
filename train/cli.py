"""`grm-engine train STAGE [--config FILE.yaml] [--deepspeed PRESET|FILE] [--key value ...]`.

Every config key is a flag (dashes or underscores); flags override the YAML file, which overrides the defaults.
Errors in the config exit with status 2 before any model is loaded. Under the `deepspeed` launcher the
`--local_rank=N` argument it adds is read into LOCAL_RANK.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import sys

from .config import STAGES, ConfigError, load_config

USAGE = f"""usage: grm-engine train {{{','.join(STAGES)}}} [--config FILE.yaml] [--key value ...]

stages:
  sft      supervised fine-tuning on prompt/completion jsonl (loss on completion tokens)
  rft      rejective fine-tuning: sample critiques, keep the correct ones (Eq. 10), then SFT on them
  grpo     online GRPO with the +1/-1 rule reward and a KL penalty
  meta-rm  a scalar meta reward model on labelled critiques (score output or RFT trajectories)

`grm-engine train STAGE --help` lists the stage's keys and defaults.
launchers: deepspeed --num_gpus N -m grm_engine train ... --deepspeed zero2 ; torchrun --nproc-per-node N -m grm_engine train ...
"""


def _stage_help(stage: str) -> str:
    cls = STAGES[stage]
    lines = [f"usage: grm-engine train {stage} [--config FILE.yaml] [--key value ...]", "", (cls.__doc__ or "").strip(),
             "", "keys (default):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else ""
        lines.append(f"  --{f.name:<32} {default!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    argv = list(argv)
    rest = []
    for token in argv:  # the deepspeed launcher appends --local_rank=N
        if token.startswith("--local_rank=") or token.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", token.split("=", 1)[1])
        else:
            rest.append(token)
    argv = rest
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    stage, argv = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"grm-engine train: error: unknown stage {stage!r}; give one of {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(_stage_help(stage))
        return 0
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("grm-engine train: error: --config needs a file", file=sys.stderr)
            return 2
        config_file = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    from .engine import NonFiniteError

    try:
        config = load_config(stage, config_file, argv)
        from .api import run_stage

        result = run_stage(stage, config)
    except ConfigError as e:
        print(f"grm-engine train {stage}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"grm-engine train {stage}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"grm-engine train {stage}: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a file-size limit while saving: checkpoints are atomic, the last one holds
        where = f" ({e.filename})" if e.filename else ""
        advice = "free space and " if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO) else ""
        print(f"grm-engine train {stage}: error: {e.strerror or e}{where}; {advice}rerun the same command to "
              "resume from the last complete checkpoint", file=sys.stderr)
        return 1
    from .engine import is_main

    if is_main():
        print(f"grm-engine train {stage}: {result.steps} steps in {result.seconds:.1f} s; model: {result.model_dir}")
    return 0

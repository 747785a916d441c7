"""Checkpoints that survive a kill: written to a temporary directory, then renamed; the newest complete one wins.

output_dir/checkpoint-STEP/
    config.json, model.safetensors (or shards), tokenizer files   a model Decoder / GRM / MetaRM load as is
    trainer_state.json      step, data cursor, stage counters (the run's position)
    optimizer.pt            plain runs: optimizer + LR scheduler state
    deepspeed/              DeepSpeed runs: its own sharded save_checkpoint (optimizer, scheduler, fp32 master)
    rng_state_RANK.pt       every rank's RNG states (python, numpy, torch, cuda); their count is the world size
    deepspeed_universal/    made on a resume at another world size: DeepSpeed's universal checkpoint of deepspeed/
    COMPLETE                written last: every file's size; a directory without it, or whose files do not
                            match it (truncated, missing), is skipped for the previous complete checkpoint
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
import warnings

import numpy as np
import torch

from .engine import barrier, is_main, rank, world_size

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_sizes(root: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, root)] = os.path.getsize(full)
    return sizes


def _torch_save(obj, path: str) -> None:
    """torch.save, whose failed write (a full disk, a file-size limit) is a RuntimeError from its C++ stream: an
    OSError naming the file, as every other write here."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"cannot write the file ({str(e).splitlines()[0]})", path) from None


def save_model(engine, tokenizer, path: str, state_dict=None) -> None:
    """The consolidated model (safetensors) + tokenizer into `path` (rank 0 writes; collective under ZeRO-3)."""
    if state_dict is None:
        state_dict = engine.consolidated_state_dict()
    if is_main():
        os.makedirs(path, exist_ok=True)
        module = engine.module
        module.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def save_checkpoint(engine, tokenizer, output_dir: str, step: int, trainer_state: dict, keep: int) -> str:
    """Write checkpoint-STEP atomically; keep the newest `keep` complete ones. Collective: every rank calls it."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if engine.deepspeed is not None:
        engine.deepspeed.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
    elif is_main():
        _torch_save({"optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict()},
                    os.path.join(tmp, "optimizer.pt"))
    _torch_save(_rng_state(), os.path.join(tmp, f"rng_state_{rank()}.pt"))
    save_model(engine, tokenizer, tmp)
    barrier()
    if is_main():
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **trainer_state}, f, indent=1)
        sizes = _file_sizes(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"step": step, "files": sizes}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # a checkpoint of the same step from an earlier, incomplete attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        for old in complete_checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint directory cannot be resumed from (None: it is complete)."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return "no COMPLETE marker (the save was interrupted)"
    try:
        with open(marker) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable COMPLETE marker"
    for name, size in expected.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} were written"
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    return None


def complete_checkpoints(output_dir: str, *, warn: bool = False) -> list[str]:
    """Complete checkpoint directories, newest first; incomplete ones are skipped (with a warning)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match:
            path = os.path.join(output_dir, name)
            problem = checkpoint_problem(path)
            if problem is None:
                found.append((int(match.group(1)), path))
            elif warn:
                warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir, warn=True)
    return found[0] if found else None


def saved_world_size(path: str) -> int:
    """How many processes wrote a checkpoint (each wrote its rng_state_RANK.pt)."""
    return sum(1 for name in os.listdir(path) if re.match(r"^rng_state_\d+\.pt$", name)) or 1


def check_resume_world_size(config, path: str) -> None:
    """Before any model loads: a checkpoint written by another number of processes resumes only under ZeRO-1/2
    (through DeepSpeed's universal checkpoint). A ZeRO-3 resume through it did not continue exactly (DeepSpeed
    0.19.8 on the CPU, forced at one world size: the loaded weights were right, the next step's loss was off by 5e-5
    relative where ZeRO-2's matched bit for bit; cause not found), so it is refused. (ConfigError)"""
    from .config import ConfigError
    from .engine import resolve_deepspeed_config

    saved = saved_world_size(path)
    if saved == world_size() or not config.deepspeed:
        return
    try:
        stage = int(resolve_deepspeed_config(config.deepspeed).get("zero_optimization", {}).get("stage", 0))
    except ValueError:
        return  # the engine names a bad DeepSpeed config itself
    if stage == 3:
        raise ConfigError(f"{path} was written by {saved} processes and this run has {world_size()}: a ZeRO-3 "
                          f"checkpoint resumes only at the world size that wrote it (through DeepSpeed's universal "
                          f"checkpoint a ZeRO-3 run did not continue exactly in our tests); rerun with {saved} "
                          f"processes, or start a new "
                          f"run (new output_dir) from the weights in {path} with model = {path}")
    if is_main():
        print(f"{path}: written by {saved} processes, resumed by {world_size()} through DeepSpeed's universal "
              f"checkpoint; the global batch becomes per_device_train_batch_size x gradient_accumulation_steps x "
              f"{world_size()}", file=sys.stderr)


def universal_checkpoint(path: str, saved_world: int) -> str:
    """path/deepspeed_universal: DeepSpeed's universal form of path/deepspeed (every parameter's fp32 weights and
    optimizer moments whole, loadable at any world size), converted once by rank 0 through a temporary folder.
    Costs disk: about 12 bytes per parameter."""
    folder = os.path.join(path, "deepspeed_universal")
    if is_main() and not os.path.isdir(folder):
        tmp = os.path.join(path, ".tmp-deepspeed_universal")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"{path}: converting DeepSpeed's checkpoint (written by {saved_world} processes) to a universal one in "
              f"{folder}", file=sys.stderr)
        _convert_to_universal(os.path.join(path, "deepspeed", "state"), os.path.join(tmp, "state"))
        with open(os.path.join(tmp, "latest_universal"), "w") as f:
            f.write("state")
        os.replace(tmp, folder)
        _fsync_dir(path)
    barrier()
    return folder


def _convert_to_universal(input_folder: str, output_folder: str) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_training_state(engine, path: str) -> dict:
    """Restore optimizer, scheduler (and DeepSpeed's shards) and this rank's RNG from `path` -> trainer_state.
    The model weights come from the checkpoint's safetensors (plain runs build the model from `path`);
    under DeepSpeed, load_checkpoint restores them with the fp32 master weights."""
    if engine.deepspeed is not None:
        saved_world = saved_world_size(path)
        universal = saved_world != world_size()
        folder = universal_checkpoint(path, saved_world) if universal else os.path.join(path, "deepspeed")
        config = engine.deepspeed._config  # DeepSpeed reads this flag at load time only
        config.load_universal_checkpoint = universal
        try:
            loaded, _ = engine.deepspeed.load_checkpoint(folder, tag="state", load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        except Exception as e:  # noqa: BLE001 (named and re-raised)
            if not universal:
                raise
            raise RuntimeError(f"{path}: saved by {saved_world} processes; DeepSpeed could not load its universal "
                               f"checkpoint ({folder}) into {world_size()} ({type(e).__name__}: {e}); resume with "
                               f"{saved_world} processes") from e
        finally:
            config.load_universal_checkpoint = False
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load its state from {folder}")
    else:
        state = torch.load(os.path.join(path, "optimizer.pt"), map_location=engine.device, weights_only=False)
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng_state_{rank()}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        warnings.warn(f"{path}: no RNG state for rank {rank()} (resumed at another world size); RNG reseeded")
    trainer_state = read_trainer_state(path)
    engine.step_count = int(trainer_state["step"])
    return trainer_state

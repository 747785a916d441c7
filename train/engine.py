"""One training engine for every stage: plain PyTorch on one device, or DeepSpeed (ZeRO-2 / ZeRO-3, bf16)
when config.deepspeed names a preset or a JSON file.

The loop a stage writes is the same either way:
    engine = Engine(model, config, total_steps)
    for each micro-batch of the step:  engine.backward(loss)   # loss = this micro-batch's share of the step's
                                                                 # global mean (already divided by global counts)
    engine.step()                                              # clip, check, update, schedule
`backward` takes losses normalized by GLOBAL counts (all micro-batches, all ranks), so gradients agree for
gradient_accumulation_steps 1 vs k and for 1 vs N processes. DeepSpeed divides each backward by the
accumulation steps and averages gradients over ranks; the engine multiplies by both to undo it.
Data parallelism, accumulation, optimizer and checkpoint sharding are DeepSpeed's; nothing here is home-made
distributed code beyond reading the launcher's environment and summing scalar counts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from importlib import resources

import torch

PRESETS = ("zero2", "zero3", "zero3_offload")


class NonFiniteError(RuntimeError):
    """NaN or Inf in a loss or a gradient: training stops, naming the step and the tensor."""


# ---------------------------------------------------------------- the launcher's environment
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def distributed() -> bool:
    """Several processes in a joined process group (init_distributed ran under a launcher)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over ranks (global token / sequence counts, metrics)."""
    if not distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(values: list[float], device) -> list[float]:
    """The largest of a few scalars over ranks (wall times: ranks run at once)."""
    if not distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def resolve_device(config) -> torch.device:
    if config.device:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device = {config.device!r} but CUDA is not available on this machine")
        if device.type == "cuda" and device.index is None:  # DeepSpeed and set_device need an index
            device = torch.device("cuda", local_rank() if world_size() > 1 else torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if world_size() > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config, device) -> torch.dtype:
    if config.dtype:
        return getattr(torch, config.dtype)
    return torch.bfloat16 if (config.deepspeed and device.type == "cuda") else torch.float32


def resolve_deepspeed_config(spec: str) -> dict:
    """A preset name or a JSON file -> the DeepSpeed config dict (with "auto" values still to fill)."""
    if spec in PRESETS:
        text = resources.files("grm_engine.train").joinpath("presets", f"{spec}.json").read_text()
        return json.loads(text)
    if not os.path.isfile(spec):
        raise ValueError(f"neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")
    with open(spec, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("a DeepSpeed config must be a JSON object")
    return config


def _fill_auto(ds: dict, config, dtype: torch.dtype) -> dict:
    """Fill DeepSpeed's "auto" values from our config; a value the user set must agree with ours."""
    ours = {"train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "gradient_clipping": config.max_grad_norm}
    for key, value in ours.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"DeepSpeed config sets {key} = {ds[key]} but the training config has {value}; "
                             "set it in one place (leave it \"auto\" in the DeepSpeed file)")
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    bf16 = dtype == torch.bfloat16
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    ds.setdefault("fp16", {"enabled": False})
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("the DeepSpeed config has an optimizer/scheduler section; the engine builds AdamW and the "
                         "schedule from the training config (learning_rate, lr_scheduler_type, ...): remove it")
    return ds


def resolve_leaf_modules(ds: dict, model: torch.nn.Module) -> dict:
    """ZeRO-3's `zero_optimization.leaf_module.classes` may hold "auto" (our zero3 presets do): it becomes the
    model's transformer-block classes (transformers' `_no_split_modules`, e.g. Qwen2DecoderLayer) plus DeepSpeed's
    default MoE blocks. ZeRO-3 then fetches a block's parameters at once behind one hook, as FSDP wraps a block,
    instead of one fetch and four hooks per linear (host-bound: a 0.5B GRPO step spent ~1.2 s of 5 s in those
    hooks, bench/RESULTS.md). A config without "auto" is passed to DeepSpeed as written."""
    leaf = ds.get("zero_optimization", {}).get("leaf_module")
    classes = leaf.get("classes") if isinstance(leaf, dict) else None
    if isinstance(classes, str):
        classes = [classes]
    if not classes or "auto" not in classes:
        return ds
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    blocks = list(getattr(model, "_no_split_modules", None) or [])
    leaf["classes"] = list(dict.fromkeys([c for c in classes if c != "auto"] + blocks + DEFAULT_LEAF_MODULE_CLASSES))
    return ds


def build_optimizer(params, config):
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), foreach=False)


def build_scheduler(optimizer, config, total_steps: int):
    from transformers import get_scheduler

    name = config.lr_scheduler_type
    warmup = int(math.ceil(config.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(config) -> None:
    """Join the process group DeepSpeed needs: under a launcher (torchrun, deepspeed) from its environment; a
    single process without one gets a one-member group on localhost. nccl on GPU, gloo on CPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if not config.deepspeed:
        if world_size() > 1:
            raise ValueError(f"WORLD_SIZE={world_size()}: several processes train only under DeepSpeed; add "
                             "--deepspeed zero2 (or zero3, or a JSON file)")
        return
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # no launcher: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = resolve_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", dist_init_required=True)


class Engine:
    """Wraps a model for training; see the module docstring."""

    def __init__(self, model: torch.nn.Module, config, total_steps: int):
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.total_steps = total_steps
        self.world_size = world_size()
        self.deepspeed = None
        self.step_count = 0
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.deepspeed:
            import deepspeed

            init_distributed(config)
            ds_config = resolve_leaf_modules(_fill_auto(resolve_deepspeed_config(config.deepspeed), config, self.dtype),
                                             model)
            self.ds_config = ds_config
            model = model.to(self.device)
            optimizer = build_optimizer(list(model.named_parameters()), config)
            scheduler = build_scheduler(optimizer, config, total_steps)
            self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
            self.module = self.deepspeed.module
            self.zero_stage = self.deepspeed.zero_optimization_stage()
            leaves = [type(m).__name__ for m in self.module.modules() if getattr(m, "_z3_leaf", False)]
            if self.zero_stage == 3 and leaves and is_main():
                print(f"ZeRO-3 fetches {len(leaves)} blocks whole (leaf_module: "
                      f"{', '.join(sorted(set(leaves)))})", flush=True)
        else:
            if self.world_size > 1:
                raise ValueError("several processes need --deepspeed")
            # plain mode keeps fp32 master weights; on a GPU the forward runs under bf16 autocast
            self.module = model.to(self.device, dtype=torch.float32 if self.dtype == torch.bfloat16 else self.dtype)
            self.optimizer = build_optimizer(list(self.module.named_parameters()), config)
            self.scheduler = build_scheduler(self.optimizer, config, total_steps)
            self.zero_stage = 0
        self.module.train()

    # ---- forward context: bf16 autocast for plain GPU runs
    def autocast(self):
        if self.deepspeed is None and self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"step {self.step_count + 1}: {name} is not finite ({value.detach().float().flatten()[:4].tolist()}); "
                                 "training stopped, the last complete checkpoint is intact")

    def backward(self, loss: torch.Tensor, *, last: bool, name: str = "loss") -> None:
        """loss: this micro-batch's share of the step's global mean (divided by global counts);
        last: this is the step's final micro-batch (DeepSpeed reduces gradients across ranks then).
        The number of micro-batches may vary from step to step (GRPO sizes them by tokens)."""
        self.check_finite(name, loss)
        if self.deepspeed is not None:
            # DeepSpeedEngine.forward opens every micro-batch with this call; the stages run the module's parts
            # directly, so it is made here. ZeRO-3 counts micro-steps in it: without it each micro-batch's
            # gradient overwrote the previous one instead of adding to it (older DeepSpeed has no such method).
            open_micro_step = getattr(self.deepspeed.optimizer, "clear_backward_seen_flag", None)
            if open_micro_step is not None:
                open_micro_step()
            self.deepspeed.set_gradient_accumulation_boundary(last)
            # DeepSpeed divides by its accumulation steps and averages over ranks: undo both (sum semantics)
            self.deepspeed.backward(loss * (self.gradient_accumulation_steps * self.world_size))
            self.deepspeed.step()  # updates only at the boundary
        else:
            loss.backward()

    def step(self) -> float:
        """Finish the optimizer step after its last micro-batch -> the gradient norm (before clipping)."""
        if self.deepspeed is not None:
            norm = self.deepspeed.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            if not math.isfinite(norm):
                raise NonFiniteError(f"step {self.step_count + 1}: gradient norm is {norm}; training stopped, the last "
                                     "complete checkpoint is intact")
        else:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm_tensor = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
            norm = float(norm_tensor)
            if not math.isfinite(norm):
                bad = next((n for n, p in self.module.named_parameters()
                            if p.grad is not None and not torch.isfinite(p.grad).all()), "?")
                raise NonFiniteError(f"step {self.step_count + 1}: the gradient of {bad} is not finite; training "
                                     "stopped, the last complete checkpoint is intact")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def shard_frozen(self, module: torch.nn.Module):
        """A frozen module (GRPO's reference) partitioned across the ranks as ZeRO-3 partitions the policy: an
        inference-only DeepSpeed engine with the policy's ZeRO-3 and precision settings, no optimizer. Its forward
        gathers each layer's parameters on the fly, so every rank must run the same number of forwards (the GRPO
        update pads its micro-batches to the same count on every rank). -> (the engine, to keep alive; its module)."""
        if self.zero_stage != 3:
            raise ValueError("a sharded reference needs ZeRO-3 (deepspeed zero_optimization.stage 3)")
        import copy

        import deepspeed

        ds_config = copy.deepcopy(self.ds_config)
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        zero = ds_config.setdefault("zero_optimization", {})
        zero.pop("offload_optimizer", None)  # no optimizer states to offload
        module = module.to(self.device).eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        engine.eval()
        return engine, engine.module

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Full parameters visible on every rank (ZeRO-3 gathers them; otherwise a no-op)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield
        else:
            yield

    def consolidated_state_dict(self) -> dict | None:
        """The full model state on rank 0 (collective under ZeRO-3), None on other ranks."""
        if self.zero_stage == 3:
            state = self.deepspeed._zero3_consolidated_16bit_state_dict()
            return state if is_main() else None
        return {k: v for k, v in self.module.state_dict().items()} if is_main() else None

"""Decoder: the user-facing engine. from_pretrained builds model, KV pool, scheduler; generate runs requests."""
from __future__ import annotations

import random
import time

import torch

from . import loader
from .block_manager import BlockManager
from .config import DecoderConfig, SamplingParams
from .model_runner import ModelRunner
from .models import model_class
from .outputs import DecoderStats, RequestOutput, SampleOutput  # noqa: F401 (importable from here too)
from .sampler import sample
from .scheduler import ScheduledBatch, Scheduler
from .request_checks import check_sampling_params, tokenize_prompts
from .sequence import PENDING, Sequence, SequenceStatus
from .step_state import PendingStep, SamplingArrays


MERGE_COPY_LIMIT_BYTES = 1 << 30  # a live model's merged q/k/v + gate/up copy is made up to this size


def _default_device_dtype(device, dtype, config):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Decoder: device {device} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must compare equal (zero-copy check)
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype if device.type == "cuda" and dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"Decoder: dtype must be float32, bfloat16 or float16, got {dtype}")
    return device, dtype


class Decoder:
    def __init__(self, model, tokenizer, config: DecoderConfig, eos_token_ids: list[int], max_model_len: int,
                 shares_live_weights: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.shares_live_weights = shares_live_weights
        self.vocab_size = model.lm_head.shape[0]
        model.skinny_linear = config.skinny_linear  # read by the model's linear() on decode steps
        num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.max_num_seqs, config.use_cuda_graphs(),
                                  config.max_cuda_graphs, config.cascade_attention, config.num_scheduler_steps)
        self.stats = DecoderStats()
        self.step_hook = None  # called with each finished ScheduledBatch (profilers, progress probes)
        self._next_seq_id = 0

    @classmethod
    def from_pretrained(cls, path_or_module, *, tokenizer=None, dtype=None, device=None, block_size: int = 16,
                        kv_cache_memory_fraction: float = 0.9, max_num_seqs: int = 256, num_kv_blocks: int | None = None,
                        max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                        enable_prefix_caching: bool = True, cuda_graphs: bool = True,
                        cascade_attention: bool = True, num_scheduler_steps: int = 8, warmup: bool = True,
                        skinny_linear: bool = False,
                        merge_projections: bool | None = None,
                        trust_remote_code: bool = False) -> "Decoder":
        """path_or_module: a Hugging Face checkpoint directory (config.json + *.safetensors) or a live
        transformers causal LM (its weights are shared, not copied, when dtype/device match).
        cuda_graphs=False (or GRM_ENGINE_CUDA_GRAPHS=0) runs the decode step eagerly, same numbers (for debugging);
        cascade_attention=False keeps the plain paged kernel when samples share a prompt.
        num_scheduler_steps: decode steps launched per round of host bookkeeping (CUDA graph path; same tokens
        for any value, 1 pays the host's per-sequence work every token).
        skinny_linear (experimental, off by default): decode steps run the projections through the split-K Triton
        kernel (grm_engine.kernels.skinny_linear) instead of cuBLAS; prefill is unchanged.
        warmup (CUDA): run Decoder.warmup() here, so the first generate does not pay kernel loading.
        merge_projections: q/k/v and gate/up as one GEMM each. None: yes for a checkpoint directory (the weights
        become views of the merged tensors, no extra memory) and for a live module whose mergeable weights take
        at most 1 GiB (a copy, refreshed at every generate call); False: never; True: always.
        trust_remote_code: let transformers run code from the checkpoint folder (config, tokenizer); off by default,
        and transformers never prompts."""
        # the engine settings are checked before anything loads (ValueError naming the setting)
        dconfig = DecoderConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory_fraction=kv_cache_memory_fraction,
                                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                                cuda_graphs=cuda_graphs, cascade_attention=cascade_attention,
                                num_scheduler_steps=num_scheduler_steps, skinny_linear=skinny_linear)
        live = isinstance(path_or_module, torch.nn.Module)
        if live:
            config = path_or_module.config
            param = next(path_or_module.parameters())
            device, dtype = torch.device(device or param.device), dtype or param.dtype
            device, dtype = _default_device_dtype(device, dtype, config)
            cls_ = model_class(config)
            weights = loader.weights_from_module(path_or_module, device, dtype, getattr(cls_, "keeps_float32", None))
        elif isinstance(path_or_module, str):
            config = loader.load_config(path_or_module, trust_remote_code=trust_remote_code)
            cls_ = model_class(config)
            device, dtype = _default_device_dtype(device, dtype, config)
            weights = loader.load_safetensors_dir(path_or_module, device, dtype, getattr(cls_, "keeps_float32", None))
            if tokenizer is None:
                tokenizer = loader.load_tokenizer(path_or_module, trust_remote_code=trust_remote_code)
        else:
            raise TypeError(f"Decoder.from_pretrained: expected a directory path or a torch.nn.Module, got {type(path_or_module).__name__}")
        source = (f"live module {type(path_or_module).__name__}" if live else f"checkpoint {path_or_module}")
        if hasattr(cls_, "normalize_weights"):  # e.g. per-expert tensors stacked into the model's layout
            try:
                weights = cls_.normalize_weights(config, weights)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        loader.check_weights(cls_, config, weights, source)
        context = loader.max_context(config, source)
        max_model_len = min(max_model_len or context, context)
        model = cls_(config, weights, max_positions=max_model_len)
        if merge_projections is None:  # fewer launches matter most for small models; a live model pays a copy
            merge_projections = not live or model.merged_bytes() <= MERGE_COPY_LIMIT_BYTES
        if merge_projections:
            model.merge_projections(owns_weights=not live)
        dconfig.max_model_len = max_model_len  # the context actually used (capped by the model's)
        decoder = cls(model, tokenizer, dconfig, loader.generation_eos_ids(path_or_module, config), max_model_len, live)
        if warmup and decoder.model.device.type == "cuda":
            decoder.warmup()
        return decoder

    def _blocks_from_memory(self) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.model, self.config.block_size)
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            hidden = self.model.config.hidden_size
            inter = getattr(self.model.config, "intermediate_size", 4 * hidden)
            # activations of the largest prefill step and the sampler's [seqs, vocab] fp32 temporaries
            reserve = self.config.max_num_batched_tokens * (3 * inter + 8 * hidden) * self.model.dtype.itemsize
            reserve += 8 * self.config.max_num_seqs * self.vocab_size * 4
            budget = free * self.config.kv_cache_memory_fraction - reserve
        else:
            budget = min(2 << 30, self.config.max_num_seqs * self.max_model_len * per_block // self.config.block_size)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise RuntimeError(f"Decoder: no memory left for the KV cache ({budget / 2**30:.2f} GiB after weights)")
        return num_blocks

    def warmup(self) -> float:
        """Load every kernel a generate call uses (Triton kernels from the compile cache, or compiled on a machine's
        first run; cuBLAS handles; the sampler) with a throwaway call: 16 samples of a 3-block prompt, a few tokens
        at two batch sizes. The pool and prefix cache are left as they were (empty); returns the seconds it took."""
        start = time.perf_counter()
        prompt = [(7 * i + 3) % self.vocab_size for i in range(3 * self.config.block_size)]
        for n in (16, 24):  # batch sizes divisible by 16 and not: Triton compiles one variant of each
            n = min(n, self.config.max_num_seqs)
            self.generate([prompt], SamplingParams(n=n, temperature=1.0, max_tokens=3, ignore_eos=True, seed=0),
                          use_tqdm=False)
        if self.block_manager.num_blocks_in_use == 0:
            self.reset_prefix_cache()
        self.stats = DecoderStats()
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter() - start

    def reset_prefix_cache(self) -> None:
        """Forget cached blocks (the weights changed, e.g. between GRPO steps)."""
        manager = self.block_manager
        assert manager.num_blocks_in_use == 0, "reset_prefix_cache during generation"
        # Only blocks in the table can be found; a block whose hash was superseded there keeps a stale hash that
        # nothing looks up, and the pool clears it on reuse. (Visiting every block cost ~30 ms at 600k blocks.)
        for block_id in manager.hash_to_block.values():
            block = manager.blocks[block_id]
            block.hash, block.parent_hash, block.token_ids = None, None, ()
        manager.hash_to_block.clear()

    # ---- the loop ----
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        token_lists = tokenize_prompts(prompts, self.tokenizer, self.vocab_size, self.max_model_len)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"generate: {len(params_list)} SamplingParams for {len(token_lists)} prompts")
        check_sampling_params(token_lists, params_list, self.config, self.block_manager.num_blocks, self.vocab_size,
                              self.max_model_len, has_tokenizer=self.tokenizer is not None)
        if self.shares_live_weights:
            self.reset_prefix_cache()
            self.model.refresh_merged()  # merged copies of live weights follow the current policy
        call_seed = random.randrange(2**63)
        # noise key per request: (seed, request_key or the request's position in this call)
        seeds = [(p.seed if p.seed is not None else call_seed, p.request_key if p.request_key is not None else r)
                 for r, p in enumerate(params_list)]

        scheduler = Scheduler(self.config, self.block_manager)
        self.block_manager.peak_blocks_in_use = self.block_manager.num_blocks_in_use
        stats = DecoderStats()
        results: list[list[SampleOutput | None]] = [[None] * p.n for p in params_list]
        for r, (ids, params) in enumerate(zip(token_lists, params_list)):
            scheduler.add(Sequence(self._new_id(), r, 0, ids, len(ids), params, num_samples_to_fork=params.n))
        total = sum(p.n for p in params_list)
        bar = _progress(total, use_tqdm)
        start = time.perf_counter()
        try:
            self._run_loop(scheduler, seeds, results, stats, bar, start)
        except BaseException:
            scheduler.abort_all()  # an interrupted run (error, Ctrl-C) must not leak blocks
            raise
        finally:
            if bar is not None:
                bar.close()
        stats.seconds = time.perf_counter() - start
        stats.prefix_cache_hit_tokens = scheduler.num_prefix_hit_tokens
        stats.peak_blocks_in_use = self.block_manager.peak_blocks_in_use
        stats.preemptions = scheduler.num_preemptions
        graphs = self.runner.graphs
        if graphs is not None:  # cumulative over the decoder's life: a shape is captured once
            stats.extra.update(cuda_graphs=len(graphs.graphs), graph_capture_s=graphs.capture_seconds,
                               graphs_enabled=graphs.enabled)
        self.stats = stats
        return [RequestOutput(r, token_lists[r], list(outs)) for r, outs in enumerate(results)]

    def _run_loop(self, scheduler, seeds, results, stats, bar, start) -> None:
        """Schedule, run, sample and append until every request is finished.

        On the CUDA graph path, decode steps run in rounds ahead of the bookkeeping: round r is launched before
        the host reads round r-1's tokens (their copy overlaps round r); a sequence's pending tokens are PENDING
        placeholders that the steps read on the device. A sequence that stops at a pending token runs wasted
        steps whose tokens are dropped. Before a prefill step or a possible preemption the pipeline drains (both
        need every token on the host)."""
        pending = None  # the decode round in flight whose tokens the host has not processed
        graphs = self.runner.graphs is not None
        while scheduler.has_work():
            step_start = time.perf_counter()
            steps = self._round_steps(scheduler) if graphs else 0
            if pending is not None and not steps:
                self._finish_pending(pending, scheduler, results, stats, bar, start)
                pending = None
                stats.decode_seconds += time.perf_counter() - step_start  # waiting for the round: decode time
                step_start = time.perf_counter()
                if not scheduler.has_work():
                    break
                steps = self._round_steps(scheduler)  # the finished sequences left: seats or blocks may be free
            if steps:
                pending = self._decode_ahead(pending, steps, scheduler, seeds, results, stats, bar, start)
                stats.decode_seconds += time.perf_counter() - step_start
                continue
            batch = scheduler.schedule()
            if not batch.seqs:
                raise RuntimeError("Decoder: the scheduler found nothing to run (KV pool too small for any sequence)")
            if batch.is_prefill:
                logits = self.runner.run(batch)
                needs_logits = [batch.needs_logits(i) for i in range(len(batch.seqs))]
                scheduler.finish_step(batch)
                stats.prefill_steps += 1
                stats.prefill_tokens += sum(batch.num_new_tokens)
                sampled, finished = self._sample_and_append(batch, needs_logits, logits, scheduler, seeds, results)
            else:  # every sequence samples; sampling inputs ride along with the step's inputs (one copy)
                host = SamplingArrays.build(batch.seqs, seeds)
                tokens, logprobs = self.runner.decode_step(batch, host)
                scheduler.finish_step(batch)
                stats.decode_steps += 1
                sampled, finished = self._append_tokens(batch.seqs, tokens, logprobs, scheduler, results)
            stats.generated_tokens += sampled
            if batch.is_prefill:
                stats.prefill_seconds += time.perf_counter() - step_start
            else:
                stats.decode_seconds += time.perf_counter() - step_start
            if self.step_hook is not None:
                self.step_hook(batch)
            _update_progress(bar, finished, stats, start)

        if pending is not None:
            self._finish_pending(pending, scheduler, results, stats, bar, start)

    def _round_steps(self, scheduler) -> int:
        """Decode steps the next round may run ahead of the bookkeeping: 0 when it cannot (a prefill is due: a
        waiting request has seats; or the free blocks might not cover every sequence's next steps: then a plain step
        may preempt). Waiting requests without seats join when a round ends after seats free up."""
        if scheduler.prefilling or not scheduler.running or (scheduler.waiting and scheduler.can_admit()):
            return 0
        steps = self.config.num_scheduler_steps
        if any(seq.params.stop for seq in scheduler.running):
            steps = 1  # a stop string is checked on text after every token: keep the waste at one step
        return steps if self.block_manager.num_free_blocks >= scheduler.round_blocks_needed(steps) else 0

    def _decode_ahead(self, pending, steps: int, scheduler, seeds, results, stats, bar, start):
        """Launch a round of `steps` decode steps (_round_steps), then process the previous round's tokens while it
        runs. -> the new pending round."""
        batch = scheduler.schedule_decode_round(steps, self.max_model_len)
        host = SamplingArrays.build(batch.seqs, seeds)
        previous_rows = {seq.seq_id: row for row, seq in enumerate(pending.seqs)} if pending is not None else None
        tokens, logprobs = self.runner.decode_round(batch, host, previous_rows, steps)
        launched = PendingStep.copy_to_host(batch, tokens, logprobs)
        stats.decode_steps += steps
        if self.step_hook is not None:
            self.step_hook(batch)
        if pending is not None:  # overlaps the round just launched
            self._finish_pending(pending, scheduler, results, stats, bar, start)
        for seq, count in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is SequenceStatus.FINISHED:  # stopped in the previous round: this round's tokens are dropped
                continue
            seq.num_computed_tokens += count
            seq.token_ids.extend([PENDING] * count)
            if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
                scheduler.retire(seq)  # its round's last pending token is its last, whatever it is
        return launched

    def _finish_pending(self, pending: "PendingStep", scheduler, results, stats, bar, start) -> None:
        """Wait for a launched round's tokens; put them in place of the placeholders, in order, until a sequence
        stops (its later tokens are dropped); register the blocks the round filled."""
        tokens, logprobs = pending.wait()
        finished = 0
        manager = self.block_manager
        for i, (seq, count) in enumerate(zip(pending.seqs, pending.num_steps)):
            if seq.status is SequenceStatus.FINISHED:  # stopped in an earlier round: this one's tokens are dropped
                continue
            first = len(seq.token_ids) - count  # the round's placeholders are the last `count` tokens
            assert seq.token_ids[first] == PENDING and seq.token_ids[-1] == PENDING
            del seq.token_ids[first:]
            row_logprobs = logprobs[i] if logprobs is not None else None
            stopped = False
            for j in range(count):
                token = tokens[i][j]
                seq.token_ids.append(token)
                stats.generated_tokens += 1
                if self._record_token(seq, token, row_logprobs[j] if row_logprobs is not None else None, scheduler,
                                      results):
                    finished += 1
                    stopped = True
                    break
            if not stopped:  # K/V was written for positions first - 1 .. first + count - 2 (their tokens are known now)
                manager.register_block_range(seq, first - 1, first + count - 1)
        _update_progress(bar, finished, stats, start)

    def _new_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def _sample_and_append(self, batch: ScheduledBatch, needs_logits, logits, scheduler, seeds, results) -> tuple[int, int]:
        """Sample one token per sequence that reached its end (n tokens for a prompt that forks).
        -> (tokens sampled, samples finished)."""
        rows, seqs = [], []
        row = 0
        for seq, need in zip(batch.seqs, needs_logits):
            if not need:
                continue
            family = [seq]
            if seq.num_samples_to_fork > 1:  # the prompt is done: fork its samples, sharing its blocks
                for j in range(1, seq.num_samples_to_fork):
                    child = seq.fork(self._new_id(), j)
                    self.block_manager.fork(seq, child)
                    scheduler.add_running(child)
                    family.append(child)
                seq.num_samples_to_fork = 1
            rows.extend([row] * len(family))
            seqs.extend(family)
            row += 1
        if not seqs:
            return 0, 0
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        host = SamplingArrays.build(seqs, seeds)
        device_arrays = [torch.from_numpy(a).to(logits.device) for a in host.arrays()]
        return self._sample_and_append_rows(seqs, logits, host, device_arrays, scheduler, results)

    def _sample_and_append_rows(self, seqs, logits, host: "SamplingArrays", device_arrays, scheduler, results) -> tuple[int, int]:
        """Row i of logits [len(seqs), V] samples seqs[i]'s next token; device_arrays = host.arrays() on the device."""
        row_hash, temperature, top_p, top_k = device_arrays
        tokens, logprobs = sample(logits, temperature, top_k, top_p, row_hash, host.want_logprobs,
                                  all_greedy=host.all_greedy, any_filter=host.any_filter, any_greedy=host.any_greedy)
        return self._append_tokens(seqs, tokens, logprobs, scheduler, results)

    def _append_tokens(self, seqs, tokens, logprobs, scheduler, results) -> tuple[int, int]:
        """tokens [len(seqs)] (log-probs [len(seqs)] or None) on the device: append, finish. -> (sampled, finished)."""
        tokens = tokens.tolist()  # the step's one sync
        logprobs = logprobs.tolist() if logprobs is not None else None
        finished = 0
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.token_ids.append(token)
            finished += self._record_token(seq, token, logprobs[i] if logprobs is not None else None, scheduler, results)
        return len(seqs), finished

    def _record_token(self, seq, token: int, logprob, scheduler, results) -> bool:
        """seq's last token is `token`: keep its log-prob, finish the sequence if it stops here. -> finished."""
        if seq.params.logprobs:
            seq.logprobs.append(logprob)
        reason = self._finish_reason(seq, token)
        if reason is None:
            return False
        scheduler.finish(seq, reason)
        results[seq.request_index][seq.sample_index] = self._output(seq, reason)
        return True

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if params.stop and self._stop_string_at_end(seq):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _stop_string_at_end(self, seq: Sequence) -> bool:
        """Did the last token complete a stop string? Decodes only a tail window of the output."""
        window = max(len(s) for s in seq.params.stop) + 8
        tail = self.tokenizer.decode(seq.output_token_ids[-window:], skip_special_tokens=True)
        last = self.tokenizer.decode(seq.output_token_ids[-window:-1], skip_special_tokens=True) if seq.num_output_tokens > 1 else ""
        return any(s in tail and s not in last for s in seq.params.stop)

    def _output(self, seq: Sequence, reason: str) -> SampleOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            if seq.params.stop:
                cut = min((text.find(s) for s in seq.params.stop if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
        return SampleOutput(seq.sample_index, seq.output_token_ids, text, reason, list(seq.logprobs) if seq.params.logprobs else None)


def _update_progress(bar, finished: int, stats: DecoderStats, start: float) -> None:
    if bar is not None:
        bar.update(finished)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{(stats.generated_tokens + stats.prefill_tokens) / max(elapsed, 1e-9):.0f} tok/s")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="sample", dynamic_ncols=True)

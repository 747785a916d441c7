"""`grm-engine train rft`: rejective fine-tuning (METHOD.md, "SPCT training").

1. Sampling, from the live model through our Decoder (weights shared, not copied): for every preference
   example, N_RFT = num_generations critiques with freshly shuffled response orders, plus (hinted = true) one
   sample whose prompt names the best response. Scores are parsed by our parser; a sample is correct by Eq. 10
   (strict; unparseable = incorrect).
2. Rejection (select_trajectories): wrong samples are dropped; an example whose N_RFT unhinted samples are all
   correct is dropped whole (too easy), its hinted sample included; a hinted sample is kept only if correct.
   Kept trajectories train the model on the prompt WITHOUT the hint (what it sees when scoring), so the hint
   guides the sampling, not the learned behaviour.
3. SFT on the kept trajectories (optionally mixed with general_data), the `sft` stage's loop.
Files in output_dir: rft_samples.jsonl (every sample, with its correctness: meta-RM training data),
rft_trajectories.jsonl (the kept ones: prompt, completion, example id, hinted) and rft_counts.json. A rerun
after a kill during SFT reuses the sampled files (they are written atomically). Under torchrun / deepspeed every
rank samples its share of the examples (data-parallel) and rank 0 writes the files in input order.
"""
from __future__ import annotations

import gc
import json
import os
import time

import torch

from ..data import DataError, load_examples
from ..grm import GRM, _stable_int, sample_permutation
from ..parsing import ParseStatus, parse_scores
from ..protocol import build_prompt, encode_text
from ..templates import resolve_template
from ..voting import is_correct
from .config import ConfigError
from .engine import barrier, distributed, init_distributed, rank, resolve_device, world_size
from .loop import TrainResult
from .run_dir import check_model_dir, load_causal_lm, load_tokenizer, prepare_output_dir
from .sft import mix_general, read_prompt_completion, tokenize_rows, train_sft_rows

HINT_SAMPLE_INDEX = -1  # the hinted sample's permutation key (unhinted samples are 0..N-1)


def select_trajectories(samples: list[dict]) -> tuple[list[dict], dict]:
    """The rejection rules on one example's samples (dicts with `hinted`, `correct`, `status`) ->
    (kept samples, counts). Pure: tests call it on hand-made samples."""
    counts = {"kept": 0, "kept_hinted": 0, "rejected_wrong": 0, "rejected_hinted_wrong": 0, "unparseable": 0,
              "dropped_too_easy": 0}
    unhinted = [s for s in samples if not s["hinted"]]
    for s in samples:
        if s["status"] != ParseStatus.OK.name:
            counts["unparseable"] += 1
    if unhinted and all(s["correct"] for s in unhinted):
        counts["dropped_too_easy"] = 1
        return [], counts
    kept = []
    for s in samples:
        if s["correct"]:
            kept.append(s)
            counts["kept_hinted" if s["hinted"] else "kept"] += 1
        else:
            counts["rejected_hinted_wrong" if s["hinted"] else "rejected_wrong"] += 1
    return kept, counts


def _correct(scores_original: list, status_names: list[str], bests: list[int]) -> list[bool]:
    """Eq. 10 through grm_engine.is_correct (the training reward's rule), on original-order scores."""
    if not scores_original:
        return []
    width = max(len(s) for s in scores_original)
    scores = torch.full((len(scores_original), width), float("nan"))
    for i, row in enumerate(scores_original):
        scores[i, : len(row)] = torch.tensor([float("nan") if v is None else float(v) for v in row])
    status = torch.tensor([ParseStatus[name].value for name in status_names], dtype=torch.int8)
    counts = torch.tensor([len(s) for s in scores_original])
    return is_correct(scores, status, torch.tensor(bests), num_responses=counts).tolist()


def _label(example) -> int:
    return example.best if example.num_responses > 1 else example.label


def sample_unhinted(grm: GRM, examples, config, seed: int) -> list[list[dict]]:
    result = grm.score(examples, k=config.num_generations, temperature=config.temperature, top_p=config.top_p,
                       shuffle=config.shuffle, seed=seed, max_tokens=config.max_completion_length)
    samples = []
    for example, record in zip(examples, result.examples):
        rows = [{"hinted": False, "text": s.text, "permutation": s.permutation, "scores": s.scores,
                 "status": s.status, "finish_reason": s.finish_reason} for s in record.samples]
        correct = _correct([r["scores"] for r in rows], [r["status"] for r in rows], [_label(example)] * len(rows))
        for row, ok in zip(rows, correct):
            row["correct"] = bool(ok)
        samples.append(rows)
    return samples


def sample_hinted(grm: GRM, examples, config, seed: int) -> list[dict | None]:
    """One sample per multi-response example with the hint line naming the best response's shown position."""
    from ..decode import SamplingParams

    lo, hi = resolve_template(config.template).score_range
    prompts, params, owners = [], [], []
    for g, example in enumerate(examples):
        if example.num_responses < 2:
            continue
        perm = sample_permutation(seed, example.id, HINT_SAMPLE_INDEX, example.num_responses, config.shuffle)
        text = build_prompt(example.query, [example.responses[i] for i in perm], template=config.template,
                            hint=perm.index(example.best), tokenizer=grm.tokenizer)
        prompts.append(encode_text(grm.tokenizer, text))
        params.append(SamplingParams(n=1, temperature=config.temperature, top_p=config.top_p,
                                     max_tokens=config.max_completion_length,
                                     seed=_stable_int("hint", seed, example.id), request_key=0))
        owners.append((g, perm))
    out: list[dict | None] = [None] * len(examples)
    if not prompts:
        return out
    outputs = grm.decoder.generate(prompts, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    parsed = parse_scores(texts, [examples[g].num_responses for g, _ in owners], lo=lo, hi=hi)
    rows = []
    for i, (g, perm) in enumerate(owners):
        shown = parsed.scores[i, : len(perm)].tolist()
        original = [None] * len(perm)
        for p, idx in enumerate(perm):
            original[idx] = None if shown[p] != shown[p] else shown[p]  # NaN -> None
        rows.append({"hinted": True, "text": texts[i], "permutation": perm, "scores": original,
                     "status": ParseStatus(int(parsed.status[i])).name, "finish_reason": outputs[i].outputs[0].finish_reason})
    correct = _correct([r["scores"] for r in rows], [r["status"] for r in rows], [examples[g].best for g, _ in owners])
    for (g, _), row, ok in zip(owners, rows, correct):
        row["correct"] = bool(ok)
        out[g] = row
    return out


def _write_jsonl_atomic(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_sampling(config, examples, tokenizer, device, log=print) -> dict | None:
    """Sample, reject, write rft_samples.jsonl / rft_trajectories.jsonl / rft_counts.json -> counts (rank 0; None
    on the other ranks). Under a launcher every rank samples every world_size-th example from its own copy of the
    model, and rank 0 writes the files in input order: the same rows as one process, since a sample's permutation
    and noise are keyed by (seed, example id), not by where the example runs."""
    from ..decode import Decoder

    shard_rank, shard_count = (rank(), world_size()) if distributed() else (0, 1)
    mine = list(range(shard_rank, len(examples), shard_count))  # this rank's example indices
    records = []  # per example: (index, sample rows, kept rows, counts)
    tic = time.perf_counter()
    if mine:
        model = load_causal_lm(config.model, config, torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = model.to(device).eval()
        decoder = Decoder.from_pretrained(model, tokenizer=tokenizer,
                                          kv_cache_memory_fraction=config.kv_cache_memory_fraction)
        grm = GRM(decoder, tokenizer, template=config.template)
        for start in range(0, len(mine), config.rollout_batch_examples):
            indices = mine[start:start + config.rollout_batch_examples]
            chunk = [examples[i] for i in indices]
            unhinted = sample_unhinted(grm, chunk, config, config.seed)
            hinted = sample_hinted(grm, chunk, config, config.seed) if config.hinted else [None] * len(chunk)
            for index, example, rows, hint in zip(indices, chunk, unhinted, hinted):
                records.append(_example_record(index, example, rows + ([hint] if hint is not None else []), config,
                                               tokenizer))
            kept = sum(len(record[2]) for record in records)
            where = f" (rank {shard_rank} of {shard_count})" if shard_count > 1 else ""
            log(f"rft sampling{where}: {start + len(chunk)}/{len(mine)} examples, {kept} trajectories kept")
        del grm, decoder, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if shard_count > 1:
        gathered = [None] * shard_count if shard_rank == 0 else None
        torch.distributed.gather_object(records, gathered, dst=0)
        if shard_rank != 0:
            return None
        records = sorted((record for part in gathered for record in part), key=lambda record: record[0])
    totals = {"examples": len(examples), "samples": 0}
    all_samples, kept_rows = [], []
    for _, samples, kept, counts in records:
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        all_samples.extend(samples)
        kept_rows.extend(kept)
    totals["seconds"] = time.perf_counter() - tic
    totals["trajectories_per_s"] = totals["samples"] / max(totals["seconds"], 1e-9)
    _write_jsonl_atomic(os.path.join(config.output_dir, "rft_samples.jsonl"), all_samples)
    _write_jsonl_atomic(trajectories_path(config), kept_rows)
    with open(os.path.join(config.output_dir, "rft_counts.json"), "w") as f:
        json.dump(totals, f, indent=1)
    return totals


def _example_record(index: int, example, samples: list[dict], config, tokenizer) -> tuple:
    """One example's sampled rows (as rft_samples.jsonl holds them), kept trajectories and counts."""
    kept, counts = select_trajectories(samples)
    counts = dict(counts, samples=len(samples))
    shown = lambda s: [example.responses[i] for i in s["permutation"]]  # noqa: E731
    sample_rows = [{"id": example.id, "query": example.query, "responses": shown(s), "label": _label(example), **s}
                   for s in samples]
    kept_rows = [{"id": example.id, "prompt": build_prompt(example.query, shown(s), template=config.template,
                                                           tokenizer=tokenizer),
                  "completion": s["text"], "hinted": s["hinted"]} for s in kept]
    return index, sample_rows, kept_rows, counts


def trajectories_path(config) -> str:
    return config.trajectories or os.path.join(config.output_dir, "rft_trajectories.jsonl")


def run_rft(config, log=print) -> TrainResult:
    check_model_dir(config.model, trust_remote_code=config.trust_remote_code)
    try:
        examples = list(load_examples(config.data))
    except DataError as e:
        raise ConfigError(f"bad data: {e}") from None
    single = resolve_template(config.template).variant == "single"
    for example in examples:
        if example.num_responses == 1 and not single:
            raise ConfigError(f"{example.source}, line {example.line}: example {example.id!r} has one response; "
                              f"RFT with template {config.template!r} needs n >= 2 (use template single for "
                              "labelled singles)")
    resume_from = prepare_output_dir(config, "rft")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    device = resolve_device(config)
    counts_file = os.path.join(config.output_dir, "rft_counts.json")
    if os.path.isfile(trajectories_path(config)) and (os.path.isfile(counts_file) or config.trajectories):
        log(f"rft: reusing the sampled trajectories in {trajectories_path(config)}")
        counts = json.load(open(counts_file)) if os.path.isfile(counts_file) else {}
    else:
        init_distributed(config)  # under a launcher the ranks share the sampling; rank 0 writes the files
        run_sampling(config, examples, tokenizer, device, log=log)
        barrier()
        counts = json.load(open(counts_file))
    log("rft: " + ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int)))
    pairs = read_prompt_completion(trajectories_path(config)) if os.path.getsize(trajectories_path(config)) else []
    if not pairs:
        raise ConfigError(f"rft: no trajectory was kept ({counts}); nothing to fine-tune on. Every example was too "
                          "easy or every sample wrong: use harder data, more num_generations, or hinted sampling")
    rows = tokenize_rows(pairs, tokenizer, config.max_seq_length)
    general = tokenize_rows(read_prompt_completion(config.general_data), tokenizer, config.max_seq_length) \
        if config.general_data else []
    rows = mix_general(rows, general, config.general_ratio, config.seed)
    result = train_sft_rows("rft", config, tokenizer, rows, resume_from, log=log)
    result.extra["rft_counts"] = counts
    return result

"""`grm-engine score`: score examples in chunks of --chunk-size (one decoder run per chunk: continuous batching
across the chunk's examples and samples; chunks bound memory and give resumable progress) and append one JSON line
per example after each chunk (whole lines, flushed), so an interrupted run leaves a valid file and a rerun with the
same --out skips the ids already written. grm_engine/results_file.py guards the file: a sidecar FILE.meta.json
records the run that produced it (a resume that differs is refused) and is locked while a run writes; a file that is
not ours is never touched. A partly written chunk is scored again whole and only its missing ids are written. A
sample's permutation and sampling noise are keyed by (seed, example id, ...), not by its position in a run, its
chunk or its process, so a resume (at any world size) writes the samples an uninterrupted run would have written;
only a different batch composition can change a token, through floating-point rounding on the GPU.
`score_in_chunks` serves `eval` too.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from .cli_checks import UsageError, check_inputs, load_grm
from .results_file import ResultsFileError, check_output_path, open_results, run_record


def score_in_chunks(grm, examples, args, *, k, temperature, k_meta=None, chunks=None, desc="score"):
    """Yield (chunk examples, ScoreResult) per chunk, with a progress bar in examples/s and tokens/s. Several
    ranks: each scores its share of the chunk; rank 0 gets the chunk's result in input order, the others None."""
    from tqdm.auto import tqdm

    ranks = args.ranks
    size = args.chunk_size
    chunks = chunks if chunks is not None else [examples[i:i + size] for i in range(0, len(examples), size)]
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="ex", dynamic_ncols=True, file=sys.stderr,
               disable=not ranks.is_main)
    tokens, start = 0, time.perf_counter()
    try:
        for chunk in chunks:
            result = ranks.score(chunk, lambda shard: grm.score(
                shard, k=k, k_meta=k_meta, temperature=temperature, shuffle=not args.no_shuffle, seed=args.seed,
                max_tokens=args.max_tokens,
                progress=ranks.is_main and sys.stderr.isatty()))  # the decoder's per-sample bar inside a chunk
            if result is None:  # not rank 0
                yield chunk, None
                continue
            tokens += result.generated_tokens
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s")
            yield chunk, result
    finally:
        bar.close()


def _run_settings(args) -> dict:
    return {"k": args.k, "k_meta": args.k_meta, "temperature": args.temperature, "seed": args.seed,
            "shuffle": not args.no_shuffle, "template": args.template, "max_tokens": args.max_tokens,
            "chunk_size": args.chunk_size}


def cmd_score(args) -> int:
    ranks, lock = args.ranks, None
    try:
        with ranks.together():  # a check that fails on any rank stops every rank before a model loads
            if args.k < 1:
                raise UsageError("--k must be >= 1")
            try:
                if ranks.is_main:
                    check_output_path(args.out, args.data)
                examples = check_inputs(args, args.k)
                settings = _run_settings(args)
                done = set()
                if ranks.is_main:  # rank 0 alone holds the lock and writes the file
                    done, lock = open_results(args.out, run_record(args, settings), settings)
            except ResultsFileError as e:
                raise UsageError(str(e)) from None
        return _score_rest(args, examples, settings, ranks.share(done))
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _score_rest(args, examples, settings: dict, done: set[str]) -> int:
    """Score the chunks that still lack ids and append their rows (the results file is locked)."""
    ranks = args.ranks
    chunks = [examples[i:i + args.chunk_size] for i in range(0, len(examples), args.chunk_size)]
    todo = [c for c in chunks if any(e.id not in done for e in c)]
    if ranks.is_main:
        print(f"{len(examples)} examples, {len(done)} already in {args.out}, {sum(len(c) for c in todo)} to score "
              f"in {len(todo)} chunks" + (f" on {ranks.world} ranks" if ranks.world > 1 else ""), file=sys.stderr)
    if not todo:
        return 0
    with ranks.together():
        grm = load_grm(args)
    results = []
    with open(args.out, "a", encoding="utf-8") if ranks.is_main else contextlib.nullcontext() as out:
        for chunk, result in score_in_chunks(grm, examples, args, k=args.k, temperature=args.temperature,
                                             k_meta=args.k_meta, chunks=todo):
            if result is None:  # not rank 0
                continue
            for example in result.examples:
                if example.id in done:
                    continue
                out.write(json.dumps({**example.to_json(), "settings": settings}, ensure_ascii=False) + "\n")
                out.flush()
            os.fsync(out.fileno())
            results.append(result)
    if not ranks.is_main:
        return 0
    stats = results[0].concat(results).stats()
    print(json.dumps({"out": args.out, **stats}))
    return 0

"""What `score` and `eval` check before any model is loaded (the data file, the checkpoint folders, the run options,
the prompt lengths), and the model load itself. A problem is a UsageError: `error: ...` and exit status 2."""
from __future__ import annotations

import sys

from .data import DataError, load_examples


class UsageError(Exception):
    """A problem with the command line or its files, reported as `error: ...` with exit status 2."""
    exit_status = 2


def _load_data(args):
    try:
        examples = load_examples(args.data, format=args.format, skip_invalid=args.skip_invalid)
    except DataError as e:
        raise UsageError(f"bad data: {e}") from None
    if examples.skipped:
        print(f"skipped {examples.skipped} invalid rows (first: {examples.errors[0]})", file=sys.stderr)
    return examples


def check_inputs(args, k_max: int):
    from .grm import check_checkpoint_dir
    from .meta_rm import check_meta_rm_dir
    from .preflight import PreflightError, check_prompt_lengths, check_run_options

    if args.k_meta is not None and not args.meta_rm:
        raise UsageError("--k-meta needs --meta-rm")
    try:
        check_run_options(args, k_max)
    except PreflightError as e:
        raise UsageError(str(e)) from None
    examples = _load_data(args)
    first_seen = {}
    for example in examples:  # ids key the results file (resume) and the sampling seeds
        if example.id in first_seen:
            raise UsageError(f"bad data: {example.source}, line {example.line}: id {example.id!r} repeats the id at "
                             f"line {first_seen[example.id]}; results are keyed by id, so ids must be unique")
        first_seen[example.id] = example.line
    try:
        check_checkpoint_dir(args.model, trust_remote_code=args.trust_remote_code)
        if args.meta_rm:
            check_meta_rm_dir(args.meta_rm)
        kept, dropped = check_prompt_lengths(args.model, examples, template=args.template, k=k_max, seed=args.seed,
                                             shuffle=not args.no_shuffle, trust_remote_code=args.trust_remote_code,
                                             skip_invalid=args.skip_invalid)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dropped:
        print(f"skipped {len(dropped)} examples whose prompt does not fit the context (first: {dropped[0]})",
              file=sys.stderr)
        examples[:] = kept
        examples.skipped += len(dropped)
        if not examples:
            raise UsageError(f"bad data: {args.data}: no example fits the model context")
    return examples


def load_grm(args):
    import torch

    from .grm import GRM
    from .preflight import max_num_seqs

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return GRM.from_pretrained(args.model, meta_rm=args.meta_rm, template=args.template, dtype=dtype,
                               device=args.device, max_num_seqs=max_num_seqs(args),
                               kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                               trust_remote_code=args.trust_remote_code)

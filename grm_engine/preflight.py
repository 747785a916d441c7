"""Checks of a `score` / `eval` run that need no weights, done before any model loads: the numeric options and the
device (check_run_options), and every prompt the run will build against the checkpoint's context
(check_prompt_lengths: its tokenizer and config.json only). Each problem is a PreflightError naming the option or
the file, line and example; the CLI prints it as `error: ...` with exit status 2."""
from __future__ import annotations

import math

DEFAULT_MAX_NUM_SEQS = 256
ORDER_MARGIN_TOKENS = 16  # per response: generous room for a reordering to move a prompt's length (measured: 0)


class PreflightError(ValueError):
    """An option or an example the run cannot use; the message says which and what to do."""


def _finite(name: str, value: float, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    inside = value > low if low_open else value >= low
    if not math.isfinite(value) or not inside or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise PreflightError(f"{name} {value}: must be a finite number {bound}")


def check_device(device: str | None) -> None:
    """--device names a device this machine has: cpu, cuda or cuda:N (N below the GPU count)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise PreflightError(f"--device {device!r}: not a device name; give cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise PreflightError(f"--device {device!r}: only cpu and cuda devices are supported")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(f"--device {device}: CUDA is not available on this machine (torch "
                                 f"{torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: this machine has {torch.cuda.device_count()} GPUs "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def check_run_options(args, k_max: int) -> None:
    """The options of score/eval that the decoder would only reject after loading. k_max: the most samples one
    example gets. An --max-num-seqs left at its default grows to k_max (all samples of an example share one
    prompt and are decoded together); one given below k_max is an error."""
    _finite("--temperature", args.temperature, 0)
    _finite("--kv-cache-memory-fraction", args.kv_cache_memory_fraction, 0, 1, low_open=True)
    if args.max_tokens < 1 or args.chunk_size < 1:
        raise PreflightError("--chunk-size and --max-tokens must be >= 1")
    if args.max_num_seqs is None:
        pass  # max_num_seqs(args) gives the decoder max(256, k)
    elif args.max_num_seqs < 1:
        raise PreflightError(f"--max-num-seqs {args.max_num_seqs}: must be >= 1")
    elif k_max > args.max_num_seqs:
        raise PreflightError(f"--k {k_max} is above --max-num-seqs {args.max_num_seqs}: the k samples of an example "
                             f"are decoded together; raise --max-num-seqs to at least {k_max} (or leave it out)")
    if args.k_meta is not None and not 1 <= args.k_meta <= k_max:
        raise PreflightError(f"--k-meta {args.k_meta}: must be in 1..{k_max} (the samples voted from k)")
    check_device(args.device)


def max_num_seqs(args) -> int:
    """--max-num-seqs, or when it is left out 256 grown to the largest --k (an int for score, "1,8,32" for eval)."""
    if args.max_num_seqs is not None:
        return args.max_num_seqs
    ks = [args.k] if isinstance(args.k, int) else [int(k) for k in str(args.k).split(",") if k.strip()]
    return max([DEFAULT_MAX_NUM_SEQS, *ks])


def check_prompt_lengths(model_dir: str, examples, *, template, k: int, seed: int, shuffle: bool,
                         trust_remote_code: bool, skip_invalid: bool):
    """Every prompt the run builds (each example's distinct response orders among its k samples, encoded as
    GRM.score encodes them) is shorter than the model's context (max_position_embeddings in config.json).
    Loads the tokenizer and the config only. Too long: PreflightError naming the example, or with skip_invalid
    the example is dropped -> (kept examples, list of messages for the dropped ones)."""
    from transformers import AutoTokenizer

    from .decode import loader
    from .grm import sample_permutation
    from .protocol import build_prompt, encode_text

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers and transformers raise many types for a broken tokenizer file
        raise PreflightError(f"model {model_dir}: its tokenizer cannot be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    context = loader.max_context(loader.load_config(model_dir, trust_remote_code=trust_remote_code), f"model {model_dir}")
    kept, dropped = [], []
    for example in examples:
        where = f"{example.source}, line {example.line}: example {example.id!r}"
        def length(order):
            try:
                return len(encode_text(tokenizer, build_prompt(example.query, [example.responses[i] for i in order],
                                                               template=template, tokenizer=tokenizer)))
            except ValueError as e:  # e.g. the single-response template given two responses
                raise PreflightError(f"{where}: {e}") from None
        longest = length(range(example.num_responses))
        # each response sits between the same template lines in any order, so reordering moves the token count by a
        # few tokens at most: only a prompt near the context is encoded in every order its k samples show
        if longest + ORDER_MARGIN_TOKENS * example.num_responses >= context:
            orders = {tuple(sample_permutation(seed, example.id, j, example.num_responses, shuffle)) for j in range(k)}
            longest = max([longest, *(length(order) for order in orders)])
        if longest < context:
            kept.append(example)
            continue
        problem = (f"{where}: its prompt has {longest} tokens; the model context (max_position_embeddings in "
                   f"{model_dir}/config.json) is {context}")
        if not skip_invalid:
            raise PreflightError(f"{problem}; shorten it, or drop it with --skip-invalid")
        dropped.append(problem)
    return kept, dropped

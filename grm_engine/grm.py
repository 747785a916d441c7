"""GRM scoring with inference-time scaling (METHOD.md): k shuffled critiques per example, parsed, voted,
optionally filtered by a meta RM.

One decoder run covers the whole example list: every example's k samples become requests, and samples that
show the responses in the same order are ONE request with n = their count, so each prompt variant is prefilled
once. The permutation of sample j of an example is a pure function of (seed, example id, j), so it does not
depend on the data order. The sampling noise is keyed by a per-request seed derived from (seed, example id,
permutation), with a fixed request_key, so the decoder's noise does not depend on the request's position in the
call either: a sample is reproduced exactly whichever examples it is scored with, in any order.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .parsing import ParseStatus, parse_scores
from .protocol import build_prompt, encode_texts
from .templates import resolve_template
from .voting import VoteResult, vote


def check_checkpoint_dir(path: str, *, trust_remote_code: bool = False) -> None:
    """Fail early, without loading weights, on a directory the decoder cannot run (ValueError)."""
    from .decode.models import MODEL_CLASSES

    if not os.path.isdir(str(path)):
        raise ValueError(f"model {path}: not a directory (give a Hugging Face checkpoint directory)")
    config_path = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model {path}: no config.json (give a Hugging Face checkpoint directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config_dict = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model {config_path}: not valid JSON ({e})") from None
    if not isinstance(config_dict, dict):
        raise ValueError(f"model {config_path}: must hold a JSON object, got {type(config_dict).__name__}")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_CLASSES:
        raise ValueError(f"model {path}: model_type {model_type!r} is not supported by the decoder "
                         f"(supported: {', '.join(sorted(MODEL_CLASSES))})")
    files = os.listdir(str(path))
    if not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"model {path}: no *.safetensors weights (save with save_pretrained(safe_serialization=True))")
    if not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(files):
        raise ValueError(f"model {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                         "save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))")
    check_checkpoint_weights(path, trust_remote_code=trust_remote_code)


def check_checkpoint_weights(path: str, *, trust_remote_code: bool = False) -> None:
    """Every weight the decoder reads is in the safetensors files with the shape config.json implies; the shard
    index stays inside the folder. Reads the config and the safetensors headers only (ValueError)."""
    from .decode import loader
    from .decode.models import model_class

    try:
        config = loader.load_config(path, trust_remote_code=trust_remote_code)
        loader.check_weights(model_class(config), config, loader.weight_shapes(path), f"model {path}")
    except (OSError, TypeError, KeyError) as e:
        raise ValueError(f"model {path}: {e}") from None


def _stable_int(*parts) -> int:
    """A 63-bit integer from the parts, the same in every process (Python's hash() is salted)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_permutation(seed: int, example_id: str, sample_index: int, num_responses: int, shuffle: bool) -> list[int]:
    """perm[p] = original index of the response shown at position p, for one sample."""
    if not shuffle or num_responses == 1:
        return list(range(num_responses))
    rng = np.random.default_rng(_stable_int("perm", seed, example_id, sample_index))
    return [int(i) for i in rng.permutation(num_responses)]


@dataclass
class SampleScore:
    text: str
    permutation: list[int]  # permutation[p] = original index of the response shown at position p
    scores: list[float | None]  # parsed, in the ORIGINAL response order (None: not parsed)
    status: str  # a ParseStatus name
    meta: float | None  # meta-RM logit (None without a meta RM, or for an unparseable sample)
    voted: bool  # summed into the totals
    num_tokens: int
    finish_reason: str


@dataclass
class ExampleScore:
    id: str
    totals: list[float | None]  # summed scores in the original order; None when no sample was voted
    best: int  # index of the unique top total; -1 when tied or nothing was voted
    samples: list[SampleScore]
    label_best: int | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "totals": self.totals, "best": self.best, "label_best": self.label_best,
                "samples": [s.__dict__ for s in self.samples]}


@dataclass
class ScoreResult:
    examples: list[ExampleScore]
    k: int
    k_meta: int | None
    temperature: float
    seed: int
    parse_failures: dict[str, int]  # samples per non-OK status
    num_samples: int
    generated_tokens: int
    prompt_tokens: int  # unique prompt variants' tokens (what is prefilled)
    seconds: float
    # the raw material, to re-vote over fewer samples (eval derives Voting@k / MetaRM@k from these)
    scores: torch.Tensor = field(repr=False)  # float32 [G, k, n_max], in the SHOWN order, NaN where absent
    status: torch.Tensor = field(repr=False)  # int8 [G, k]
    perm: torch.Tensor = field(repr=False)  # int64 [G, k, n_max]
    n_responses: torch.Tensor = field(repr=False)  # int64 [G]
    meta: torch.Tensor | None = field(default=None, repr=False)  # float32 [G, k], NaN for invalid samples
    token_ids: list | None = field(default=None, repr=False)  # [G][k] generated ids (GPU parser checks)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    def vote_first(self, k: int, *, k_meta: int | None = None, use_meta: bool = False) -> VoteResult:
        """Vote over the first k samples of each example (with the meta filter: the top k_meta of those k)."""
        if not 1 <= k <= self.k:
            raise ValueError(f"k = {k} must be in 1..{self.k} (the samples drawn)")
        if use_meta and self.meta is None:
            raise ValueError("use_meta=True but this result has no meta-RM scores")
        meta = self.meta[:, :k] if use_meta else None
        k_meta = (k_meta if k_meta is not None else max(1, k // 2)) if use_meta else None
        return vote(self.scores[:, :k], self.status[:, :k], perm=self.perm[:, :k], n_responses=self.n_responses,
                    meta=meta, k_meta=min(k_meta, k) if k_meta else None)

    def predictions(self, vote_result: VoteResult) -> list[list[float]]:
        """Per-example totals for the metrics: NaN for every response of an example with no voted sample
        (an unparseable example earns no credit under any tie policy)."""
        rows = []
        for g in range(len(self.n_responses)):
            n = int(self.n_responses[g])
            voted = bool(vote_result.used[g].any())
            rows.append([float(v) if voted else float("nan") for v in vote_result.totals[g, :n].tolist()])
        return rows

    @staticmethod
    def concat(parts: Sequence["ScoreResult"]) -> "ScoreResult":
        """One result from chunk results of the same settings (the CLI scores in chunks)."""
        first = parts[0]
        n_max = max(p.scores.shape[2] for p in parts)

        def pad(t, fill):  # [G, k, n] -> [G, k, n_max]
            extra = n_max - t.shape[2]
            if not extra:
                return t
            tail = torch.arange(t.shape[2], n_max).repeat(*t.shape[:2], 1) if fill is None else \
                torch.full((*t.shape[:2], extra), fill, dtype=t.dtype)
            return torch.cat([t, tail.to(t.dtype)], dim=2)
        failures = {name: sum(p.parse_failures[name] for p in parts) for name in first.parse_failures}
        return ScoreResult(
            examples=[e for p in parts for e in p.examples], k=first.k, k_meta=first.k_meta,
            temperature=first.temperature, seed=first.seed, parse_failures=failures,
            num_samples=sum(p.num_samples for p in parts), generated_tokens=sum(p.generated_tokens for p in parts),
            prompt_tokens=sum(p.prompt_tokens for p in parts), seconds=sum(p.seconds for p in parts),
            scores=torch.cat([pad(p.scores, float("nan")) for p in parts]), status=torch.cat([p.status for p in parts]),
            perm=torch.cat([pad(p.perm, None) for p in parts]), n_responses=torch.cat([p.n_responses for p in parts]),
            meta=None if first.meta is None else torch.cat([p.meta for p in parts]),
            token_ids=[row for p in parts for row in (p.token_ids or [])])

    def stats(self) -> dict:
        return {"examples": len(self.examples), "samples": self.num_samples, "parse_failures": self.parse_failures,
                "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
                "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1)}


def _none_if_nan(values) -> list[float | None]:
    return [None if v != v else float(v) for v in values]


class GRM:
    def __init__(self, decoder, tokenizer, *, meta_rm=None, template="default"):
        """template: "default", "single", a template file, "single:FILE" or a PromptTemplate (templates.py);
        it gives the GRM's prompt and the meta RM's (a meta RM given here reads its `meta` section)."""
        template = resolve_template(template)
        if tokenizer is None:
            raise ValueError("GRM needs a tokenizer (none was found in the checkpoint directory; pass tokenizer=)")
        self.decoder, self.tokenizer, self.meta_rm, self.template = decoder, tokenizer, meta_rm, template
        if meta_rm is not None:
            meta_rm.template = template

    @classmethod
    def from_pretrained(cls, path, *, meta_rm=None, template="default", tokenizer=None,
                        trust_remote_code: bool = False, **decoder_kwargs) -> "GRM":
        """path: a checkpoint directory (or a live transformers causal LM, with tokenizer=).
        meta_rm: None, a MetaRM, or a meta-RM checkpoint directory. decoder_kwargs go to Decoder.from_pretrained.
        trust_remote_code: let transformers run code from the checkpoint folders (off by default; never a prompt)."""
        from .decode import Decoder
        from .meta_rm import MetaRM, check_meta_rm_dir

        template = resolve_template(template)  # a bad template file fails before any weight loads
        if isinstance(path, (str, os.PathLike)):
            path = str(path)
            check_checkpoint_dir(path, trust_remote_code=trust_remote_code)
        if isinstance(meta_rm, (str, os.PathLike)):
            check_meta_rm_dir(str(meta_rm))
        if tokenizer is None and isinstance(path, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if isinstance(path, str):
            decoder_kwargs["trust_remote_code"] = trust_remote_code
        decoder = Decoder.from_pretrained(path, tokenizer=tokenizer, **decoder_kwargs)
        if isinstance(meta_rm, (str, os.PathLike)):
            meta_rm = MetaRM.from_pretrained(str(meta_rm), device=decoder.model.device,
                                             trust_remote_code=trust_remote_code)
        return cls(decoder, tokenizer, meta_rm=meta_rm, template=template)

    def _prompt_text(self, example, perm: Sequence[int]) -> str:
        return build_prompt(example.query, [example.responses[i] for i in perm], template=self.template,
                            tokenizer=self.tokenizer)

    def _requests(self, examples, k: int, seed: int, shuffle: bool, sampling: dict):
        """One request per distinct permutation of each example, n = the samples that share it.
        -> prompts (token ids), SamplingParams, owners[r] = (example index, sample index of each of its n
        samples), perms [G][k]."""
        from .decode import SamplingParams

        prompts, params, owners, perms = [], [], [], []
        for g, example in enumerate(examples):
            example_perms = [sample_permutation(seed, example.id, j, example.num_responses, shuffle) for j in range(k)]
            perms.append(example_perms)
            groups: dict[tuple, list[int]] = {}
            for j, perm in enumerate(example_perms):
                groups.setdefault(tuple(perm), []).append(j)
            for perm, sample_indices in groups.items():
                prompts.append(self._prompt_text(example, perm))
                params.append(SamplingParams(n=len(sample_indices), seed=_stable_int("noise", seed, example.id, perm),
                                             request_key=0, **sampling))
                owners.append((g, sample_indices))
        prompts = encode_texts(self.tokenizer, prompts)  # one batched call: the tokenizer's threads share the work
        for ids, (g, _) in zip(prompts, owners):
            if len(ids) >= self.decoder.max_model_len:
                example = examples[g]
                raise ValueError(f"example {example.id!r} ({example.source or 'given'}, line {example.line}): its "
                                 f"prompt has {len(ids)} tokens; the model context is {self.decoder.max_model_len}")
        return prompts, params, owners, perms

    def _generate(self, prompts, params, owners, examples, k: int, progress: bool):
        """One decoder run -> texts, token ids [G][k] and finish reasons, lengths {(g, j): ...}."""
        outputs = self.decoder.generate(prompts, params, use_tqdm=progress)
        texts, token_ids = [[None] * k for _ in examples], [[None] * k for _ in examples]
        finish, lengths = {}, {}
        for request, (g, sample_indices) in zip(outputs, owners):
            for out in request.outputs:
                j = sample_indices[out.index]
                texts[g][j], token_ids[g][j] = out.text, out.token_ids
                finish[g, j], lengths[g, j] = out.finish_reason, len(out.token_ids)
        return texts, token_ids, finish, lengths

    def _meta_scores(self, examples, perms, texts, status) -> torch.Tensor:
        """float32 [G, k]: the meta RM's logit for every parseable sample (it sees the responses in the order
        the critique saw them), NaN for the others."""
        meta = torch.full(status.shape, float("nan"))
        valid = (status == ParseStatus.OK).nonzero().tolist()
        if valid:
            logits = self.meta_rm.score([examples[g].query for g, _ in valid],
                                        [[examples[g].responses[i] for i in perms[g][j]] for g, j in valid],
                                        [texts[g][j] for g, j in valid])
            for (g, j), value in zip(valid, logits.tolist()):
                meta[g, j] = value
        return meta

    def score(self, examples: Sequence, *, k: int = 1, k_meta: int | None = None, temperature: float = 0.5,
              shuffle: bool = True, seed: int = 0, max_tokens: int = 1024, top_p: float = 1.0,
              ignore_eos: bool = False, progress: bool = False) -> ScoreResult:
        """Score every example with k critiques in ONE decoder run; see the module docstring.

        temperature 0 is greedy (with k = 1: the greedy score). ignore_eos: every critique runs to max_tokens
        (benchmarks). k_meta (default k // 2, at least 1) applies when the GRM has a meta RM: every parseable
        sample is scored by it and only the top k_meta are voted.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k = {k!r} must be an int >= 1")
        if k_meta is not None and self.meta_rm is None:
            raise ValueError("k_meta needs a meta RM (GRM.from_pretrained(..., meta_rm=DIR))")
        if self.meta_rm is not None:
            k_meta = max(1, k // 2) if k_meta is None else k_meta
            if not 1 <= k_meta <= k:
                raise ValueError(f"k_meta = {k_meta} must be in 1..k (k = {k})")
        examples = list(examples)
        if not examples:
            raise ValueError("score: no examples")
        if self.template.variant == "single":
            multi = [e.id for e in examples if e.num_responses != 1]
            if multi:
                raise ValueError(f"template {self.template.spec!r} scores one response per example; {multi[:3]} "
                                 "have more")
        lo, hi = self.template.score_range

        prompts, params, owners, perms = self._requests(
            examples, k, seed, shuffle, dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                             ignore_eos=ignore_eos))
        start = time.perf_counter()
        texts, token_ids, finish, lengths = self._generate(prompts, params, owners, examples, k, progress)
        G, n_max = len(examples), max(e.num_responses for e in examples)
        flat = [texts[g][j] for g in range(G) for j in range(k)]
        counts = [examples[g].num_responses for g in range(G) for _ in range(k)]
        parsed = parse_scores(flat, counts, lo=lo, hi=hi)
        shown = torch.full((G, k, n_max), float("nan"))  # [G, k, n_max] scores in the shown order
        shown[:, :, : parsed.scores.shape[1]] = parsed.scores.reshape(G, k, -1)
        status = parsed.status.reshape(G, k)
        perm = torch.arange(n_max).repeat(G, k, 1)  # [G, k, n_max]; identity past each example's n
        for g in range(G):
            n = examples[g].num_responses
            perm[g, :, :n] = torch.tensor(perms[g])
        n_responses = torch.tensor([e.num_responses for e in examples])

        meta = self._meta_scores(examples, perms, texts, status) if self.meta_rm is not None else None
        seconds = time.perf_counter() - start

        result = ScoreResult(
            examples=[], k=k, k_meta=k_meta, temperature=temperature, seed=seed,
            parse_failures={s.name: int((status == s).sum()) for s in ParseStatus if s != ParseStatus.OK},
            num_samples=G * k, generated_tokens=sum(lengths.values()),
            prompt_tokens=sum(len(p) for p in prompts), seconds=seconds,
            scores=shown, status=status, perm=perm, n_responses=n_responses, meta=meta, token_ids=token_ids)
        voted = result.vote_first(k, k_meta=k_meta, use_meta=meta is not None)
        totals = result.predictions(voted)
        result.examples = _records(examples, result, perms, texts, finish, lengths, voted, totals)
        return result


def _records(examples, result: ScoreResult, perms, texts, finish, lengths, voted: VoteResult, totals) -> list[ExampleScore]:
    """Per-example records: each sample's scores mapped back to the original response order."""
    records = []
    shown, status, meta = result.scores, result.status, result.meta
    for g, example in enumerate(examples):
        n = example.num_responses
        samples = []
        for j in range(result.k):
            original = [float("nan")] * n
            for p in range(n):
                original[perms[g][j][p]] = float(shown[g, j, p])
            samples.append(SampleScore(
                text=texts[g][j], permutation=perms[g][j], scores=_none_if_nan(original),
                status=ParseStatus(int(status[g, j])).name,
                meta=None if meta is None or meta[g, j] != meta[g, j] else float(meta[g, j]),
                voted=bool(voted.used[g, j]), num_tokens=lengths[g, j], finish_reason=finish[g, j]))
        records.append(ExampleScore(id=example.id, totals=_none_if_nan(totals[g]), best=int(voted.best[g]),
                                    samples=samples, label_best=example.best))
    return records

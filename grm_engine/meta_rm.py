"""The meta reward model: one scalar logit per (query, responses, GRM critique), METHOD.md "Meta-RM input".

Two checkpoint kinds, one forward: the transformer body's last hidden state at the last real token
goes through a linear head with one output.
  - a transformers sequence-classification checkpoint with num_labels = 1 (head: the model's own `score`);
  - a causal LM checkpoint plus HEAD_FILE (safetensors: `weight` [1, H], optional `bias` [1]), the head
    a meta-RM trainer saves next to a causal LM body (the lm_head is ignored).
Inputs longer than max_length are shortened in the critique's middle and the responses' ends, never at the start
(encode_meta_input). Inputs are bucketed by length (sorted, then cut into batches under a token budget) and right-padded;
causal attention makes a real token's hidden state independent of the padding after it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from .protocol import build_meta_prompt, encode_text
from .templates import resolve_template

HEAD_FILE = "meta_rm_head.safetensors"


def check_meta_rm_dir(path: str) -> str:
    """Validate a meta-RM directory without loading weights -> "classifier" | "causal+head".
    Raises ValueError naming the problem (used by the CLI before any model is loaded)."""
    config_path = os.path.join(str(path), "config.json")
    if not os.path.isdir(str(path)):
        raise ValueError(f"meta RM {path}: not a directory")
    if not os.path.isfile(config_path):
        raise ValueError(f"meta RM {path}: no config.json (give a transformers checkpoint directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"meta RM {config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"meta RM {config_path}: must hold a JSON object, got {type(config).__name__}")
    architectures = config.get("architectures") or []
    architectures = architectures if isinstance(architectures, list) else [architectures]
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if labels != 1:
            raise ValueError(f"meta RM {path}: a sequence classifier with {labels} labels; the meta RM has one "
                             "output (num_labels=1)")
        kind = "classifier"
    elif os.path.isfile(os.path.join(str(path), HEAD_FILE)):
        kind = "causal+head"
    else:
        raise ValueError(f"meta RM {path}: architectures {architectures} is neither a *ForSequenceClassification "
                         f"checkpoint with one label nor a causal LM with a saved head ({HEAD_FILE})")
    _check_meta_rm_files(str(path), kind)
    return kind


def _check_meta_rm_files(path: str, kind: str) -> None:
    """The config transformers reads, readable float safetensors inside the folder, the decoder body's weights with
    their shapes (a classifier: plus score.weight [1, hidden]), a valid context length and a tokenizer that loads
    (ValueError naming them)."""
    from .decode import loader
    from .decode.models import MODEL_CLASSES, model_class

    where = f"meta RM {path}"
    try:
        config = loader.load_config(path)
        shapes = loader.weight_shapes(path)
        if getattr(config, "model_type", None) in MODEL_CLASSES:
            expected = model_class(config).expected_weights(config)
            expected.pop("lm_head.weight", None)  # the meta RM has its own head
            if kind == "classifier":
                expected["score.weight"] = ((1, config.hidden_size), True)

            class Body:  # loader.check_weights over the meta RM's own weight list
                @staticmethod
                def expected_weights(_config):
                    return expected
            loader.check_weights(Body, config, shapes, where)
        loader.max_context(config, where)
        if loader.load_tokenizer(path) is None:
            raise ValueError(f"{path}: no tokenizer files; save the tokenizer next to the weights")
    except (ValueError, OSError, NotImplementedError) as e:
        raise ValueError(f"{where}: {e}") from None


TRUNCATION_MARK = " [...] "


def _fill_level(lengths: list[int], budget: int) -> int:
    """The largest cap c with sum(min(length, c)) <= budget: cutting the longest pieces first (water filling)."""
    if sum(lengths) <= budget:
        return max(lengths, default=0)
    low, high = 0, max(lengths)
    while low < high:
        middle = (low + high + 1) // 2
        if sum(min(n, middle) for n in lengths) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def encode_meta_input(tokenizer, query, responses: Sequence[str], critique: str, max_length: int,
                      template="default") -> list[int]:
    """The meta RM's input ids, as scoring and `grm-engine train meta-rm` both encode it.

    An input longer than max_length tokens is shortened where it can afford it, never at its start: the BOS
    token, the chat template's opening, the template's instruction and the conversation are kept whole. The
    responses (cut at their end) and the critique (cut in its MIDDLE: its start holds the principles, its end
    the scores being judged) are shortened longest first, each cut marked by " [...] ". Only when the kept
    head alone exceeds max_length is the middle of the whole token sequence dropped (its first half and the
    last tokens are kept, so BOS and the critique's last words stay).
    """
    def encode(shown_responses, shown_critique):
        return encode_text(tokenizer, build_meta_prompt(query, shown_responses, shown_critique, tokenizer=tokenizer,
                                                        template=template))

    ids = encode(responses, critique)
    if len(ids) <= max_length:
        return ids
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in [*responses, critique]]
    lengths = [len(piece) for piece in pieces]
    mark = len(tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
    budget = max_length - (len(ids) - sum(lengths))  # tokens left for the pieces once the rest is kept
    for _ in range(16):  # tokens merge differently across a cut: re-encode and tighten until it fits
        cap = _fill_level(lengths, budget)
        cap = _fill_level(lengths, budget - mark * sum(n > cap for n in lengths))  # room for the marks
        shown_responses = [text if len(piece) <= cap else tokenizer.decode(piece[:cap]) + TRUNCATION_MARK.rstrip()
                           for text, piece in zip(responses, pieces)]
        critique_ids, head = pieces[-1], cap // 2
        shown_critique = critique if len(critique_ids) <= cap else (
            tokenizer.decode(critique_ids[:head]) + TRUNCATION_MARK
            + tokenizer.decode(critique_ids[len(critique_ids) - (cap - head):]))
        shortened = encode(shown_responses, shown_critique)
        if len(shortened) <= max_length:
            return shortened
        if cap == 0:
            break
        budget -= len(shortened) - max_length
    keep_head = max_length // 2
    return ids[:keep_head] + ids[len(ids) - (max_length - keep_head):]


class MetaRM:
    def __init__(self, body: torch.nn.Module, head: torch.nn.Module, tokenizer, *, max_batch_tokens: int = 16384,
                 max_length: int | None = None, template="default"):
        self.body, self.head, self.tokenizer = body.eval(), head.eval(), tokenizer
        self.template = resolve_template(template)  # its `meta` section; a GRM sets its own template here
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length or int(getattr(body.config, "max_position_embeddings", None) or 4096)
        self.device = next(body.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, device=None, tokenizer=None, max_batch_tokens: int = 16384,
                        trust_remote_code: bool = False) -> "MetaRM":
        """trust_remote_code: let transformers run code from the checkpoint folder (off by default; never a prompt)."""
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        kind = check_meta_rm_dir(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if kind == "classifier":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True).to(device)
            body, head = model.base_model, model.score
        else:
            from safetensors.torch import load_file

            body = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                             use_safetensors=True).to(device)  # safetensors only: never a pickle
            state = load_file(os.path.join(path, HEAD_FILE))
            if "weight" not in state or tuple(state["weight"].shape) != (1, body.config.hidden_size):
                raise ValueError(f"{os.path.join(path, HEAD_FILE)}: needs `weight` of shape [1, "
                                 f"{body.config.hidden_size}], got {({k: tuple(v.shape) for k, v in state.items()})}")
            head = torch.nn.Linear(body.config.hidden_size, 1, bias="bias" in state)
            head.load_state_dict(state)
            head = head.to(device=device, dtype=dtype)
        return cls(body, head, tokenizer, max_batch_tokens=max_batch_tokens)

    def encode(self, query, responses: Sequence[str], critique: str) -> list[int]:
        return encode_meta_input(self.tokenizer, query, responses, critique, self.max_length, template=self.template)

    @torch.no_grad()
    def score_token_ids(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 [N] logits for N token-id lists, batched by length (the result is in the input order)."""
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        logits = torch.empty(len(token_lists), dtype=torch.float32)
        start = 0
        while start < len(order):
            end = start + 1  # grow the batch while (batch size x longest length) fits the budget
            while end < len(order) and (end + 1 - start) * len(token_lists[order[end]]) <= self.max_batch_tokens:
                end += 1
            batch = [token_lists[i] for i in order[start:end]]
            width = len(batch[-1])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            hidden = self.body(input_ids=input_ids.to(self.device),
                               attention_mask=attention_mask.to(self.device)).last_hidden_state  # [B, T, H]
            last = attention_mask.sum(1).to(self.device) - 1  # [B]
            pooled = hidden[torch.arange(len(batch), device=self.device), last]  # [B, H]
            logits[torch.tensor(order[start:end])] = self.head(pooled).float().squeeze(-1).cpu()
            start = end
        return logits

    def score(self, queries: Sequence, responses: Sequence[Sequence[str]], critiques: Sequence[str]) -> torch.Tensor:
        """One logit per critique, float32 [N]. responses[i] in the order critique i saw them."""
        if not len(queries) == len(responses) == len(critiques):
            raise ValueError(f"MetaRM.score: {len(queries)} queries, {len(responses)} response lists and "
                             f"{len(critiques)} critiques; give one of each per item")
        if not critiques:
            return torch.empty(0, dtype=torch.float32)
        return self.score_token_ids([self.encode(q, r, c) for q, r, c in zip(queries, responses, critiques)])

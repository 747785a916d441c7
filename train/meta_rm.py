"""`grm-engine train meta-rm`: the meta reward model (METHOD.md): a scalar head on a causal-LM backbone, binary
cross-entropy on Eq. 10 labels of sampled critiques.

Data (auto-detected per line):
  - RFT samples (output_dir/rft_samples.jsonl of `train rft`): query, responses (in the order the critique saw
    them), text, correct, hinted. Hinted samples are left out (the paper trains on the non-hinted ones).
  - `grm-engine score` output: one line per example with its samples (text, permutation, scores in the original
    order, status); `examples` names the examples jsonl they came from; labels by Eq. 10 (grm_engine.is_correct).
Input = build_meta_prompt(query, shown responses, critique), encoded exactly as MetaRM.encode does at scoring
time (same template, same truncation). The trained model is a *ForSequenceClassification checkpoint with one
label: `grm-engine score --meta-rm DIR` and `GRM.from_pretrained(..., meta_rm=DIR)` load it as is.
A held-out split by example id (eval_fraction) reports loss, accuracy and ROC-AUC at every logging step.
"""
from __future__ import annotations

import json
import os

import torch

from ..data import DataError, load_examples
from ..grm import _stable_int
from ..parsing import ParseStatus
from ..meta_rm import encode_meta_input
from .batches import Row, collate, model_attention_mask
from .config import ConfigError, jsonl_objects
from .engine import resolve_device
from .loop import TrainResult, run_supervised
from .rft import _correct
from .run_dir import check_model_dir, load_dtype, load_tokenizer, prepare_output_dir


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney ROC-AUC (ties count one half); NaN when one class is absent."""
    pairs = sorted(zip(scores, labels))
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks i+1..j
        rank_sum += average_rank * sum(label for _, label in pairs[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def read_meta_rows(path: str, examples_path: str = "") -> list[dict]:
    """-> [{"id", "query", "responses" (shown order), "critique", "label"}]; errors name the file and line."""
    examples = None
    rows = []
    for _, where, obj in jsonl_objects(path):
        if "samples" in obj:  # grm-engine score output
            if examples is None:
                if not examples_path:
                    raise ConfigError(f"{where}: a `grm-engine score` results line; give `examples` (the data "
                                      "file that was scored) so the queries, responses and labels are known")
                try:
                    examples = {e.id: e for e in load_examples(examples_path)}
                except DataError as e:
                    raise ConfigError(f"bad examples: {e}") from None
            example = examples.get(obj.get("id"))
            if example is None:
                raise ConfigError(f"{where}: id {obj.get('id')!r} is not in {examples_path}")
            label = example.best if example.num_responses > 1 else example.label
            samples = obj["samples"]
            correct = _correct([s["scores"] for s in samples], [s["status"] for s in samples],
                               [label] * len(samples))
            for s, ok in zip(samples, correct):
                if s["status"] != ParseStatus.OK.name:
                    continue  # an unparseable critique is never voted: the meta RM does not rank it
                rows.append({"id": str(example.id), "query": example.query,
                             "responses": [example.responses[i] for i in s["permutation"]],
                             "critique": s["text"], "label": int(ok)})
        elif "text" in obj and "correct" in obj:  # RFT samples
            if obj.get("hinted"):
                continue
            for key in ("query", "responses"):
                if key not in obj:
                    raise ConfigError(f"{where}, field '{key}': missing")
            rows.append({"id": str(obj.get("id")), "query": obj["query"], "responses": obj["responses"],
                         "critique": obj["text"], "label": int(bool(obj["correct"]))})
        else:
            raise ConfigError(f"{where}: neither an RFT sample (text, correct) nor a score results line (samples)")
    if not rows:
        raise ConfigError(f"{path}: no labelled critiques")
    return rows


def split_by_id(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    held = lambda r: _stable_int("meta-split", seed, r["id"]) % 10_000 < eval_fraction * 10_000  # noqa: E731
    train = [r for r in rows if not held(r)]
    held_out = [r for r in rows if held(r)]
    if not train or not held_out:
        raise ConfigError(f"{len(rows)} critiques of {len({r['id'] for r in rows})} examples cannot be split "
                          f"with eval_fraction = {eval_fraction}: give more data or change eval_fraction")
    return train, held_out


def meta_logits(module, batch) -> torch.Tensor:
    hidden = module.base_model(input_ids=batch.input_ids,
                               attention_mask=model_attention_mask(module, batch.attention_mask),
                               position_ids=batch.position_ids).last_hidden_state  # [S, L, H]
    seq = torch.tensor([s for s, _ in batch.last_positions], device=hidden.device)
    pos = torch.tensor([p for _, p in batch.last_positions], device=hidden.device)
    pooled = hidden[seq, pos]  # [rows, H]
    return module.score(pooled).float().squeeze(-1)  # [rows]


def meta_micro_loss(module, batch):
    logits = meta_logits(module, batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
    correct = ((logits > 0).float() == batch.labels).sum()
    return loss, {"loss_sum": loss.detach(), "train_correct": correct}


def make_evaluator(rows: list[Row], config, pad_id: int):
    @torch.no_grad()
    def evaluate(engine) -> dict:
        module = engine.module
        was_training = module.training
        module.eval()
        logits, labels = [], []
        size = config.per_device_train_batch_size
        for start in range(0, len(rows), size):
            batch = collate(rows[start:start + size], config.max_seq_length, True, pad_id).to(engine.device)
            with engine.autocast():
                logits += meta_logits(module, batch).tolist()
            labels += batch.labels.tolist()
        module.train(was_training)
        t_logits, t_labels = torch.tensor(logits), torch.tensor(labels)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(t_logits, t_labels).item()
        accuracy = ((t_logits > 0).float() == t_labels).float().mean().item()
        return {"eval_loss": loss, "eval_accuracy": accuracy, "eval_auc": roc_auc(logits, [int(x) for x in labels])}

    return evaluate


def run_meta_rm(config, log=print) -> TrainResult:
    check_model_dir(config.model, trust_remote_code=config.trust_remote_code)
    records = read_meta_rows(config.data, config.examples)
    train_records, eval_records = split_by_id(records, config.eval_fraction, config.seed)
    resume_from = prepare_output_dir(config, "meta-rm")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    def to_rows(records):  # the meta RM's inputs with the template the GRM scored with (config.template)
        return [Row(encode_meta_input(tokenizer, r["query"], r["responses"], r["critique"], config.max_seq_length,
                                      template=config.template), [], float(r["label"]), key=r["id"]) for r in records]
    train_rows, eval_rows = to_rows(train_records), to_rows(eval_records)
    positives = sum(r["label"] for r in train_records)
    log(f"meta-rm: {len(train_rows)} training critiques ({positives} correct, {len(train_rows) - positives} wrong: "
        f"{positives / len(train_rows):.1%} positive), {len(eval_rows)} held out")
    device = resolve_device(config)
    dtype = load_dtype(config, device)

    def build(path):
        from transformers import AutoModelForSequenceClassification

        from .run_dir import from_pretrained_sdpa_or_eager

        return from_pretrained_sdpa_or_eager(
            AutoModelForSequenceClassification, path, num_labels=1, pad_token_id=pad_id, dtype=dtype,
            use_safetensors=True, trust_remote_code=config.trust_remote_code)

    result = run_supervised("meta-rm", config, train_rows, tokenizer, build, meta_micro_loss, len, resume_from,
                            evaluate=make_evaluator(eval_rows, config, pad_id), log=log)
    result.extra.update(train_rows=len(train_rows), eval_rows=len(eval_rows), positive_fraction=positives / len(train_rows))
    with open(os.path.join(config.output_dir, "meta_rm_eval.json"), "w") as f:
        json.dump({k: v for k, v in result.metrics.items() if k.startswith("eval_")} | result.extra, f, indent=1)
    return result

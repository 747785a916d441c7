"""`grm-engine demo`: the whole scoring pipeline on a fresh machine, with no download.

It trains a byte-level BPE tokenizer on GRM prompts, overfits a tiny Llama (2 layers, hidden 64) for a few
seconds so that it answers every prompt with the critique DEMO_CRITIQUE ("\\boxed{9, 2}": 9 for the response
shown first, 2 for the one shown second), writes a small jsonl data set, then runs `grm-engine score` and
`grm-engine eval` on them. The model knows nothing: the demo shows the machinery (prompts, one decoder run,
parsing, un-shuffling, voting, resumable results, the eval table), not a reward model's judgement. The tests
build their models with the same functions.
"""
from __future__ import annotations

import json
import os
import random
import time

import torch

from .data import Example
from .protocol import build_prompt

WORDS = ("the a of to and is in it you that was for on are with as they be at one have this from or had by word but "
         "what some we can out other were all there when up use your how said each she which do their time if will "
         "way about many then them write would like so these her long make thing see him two has look more day "
         "could go come did number sound no most people my over know water than call first who may down side").split()
DEMO_CRITIQUE = "\\boxed{9, 2}"


def sentence(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_examples(count: int, seed: int = 5, three_every: int = 0) -> list[Example]:
    """Synthetic examples: 2 responses (3 for every `three_every`-th), best = 0, two RewardBench subsets."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        n = 3 if three_every and i % three_every == three_every - 1 else 2
        examples.append(Example(id=f"ex{i}", query=sentence(rng), responses=[sentence(rng) for _ in range(n)], best=0,
                                subset="alpacaeval-easy" if i % 2 else "math-prm"))
    return examples


def build_tokenizer(path):
    """A 512-token byte-level BPE trained on GRM prompts, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [build_prompt(sentence(rng), [sentence(rng) for _ in range(2 + i % 2)]) for i in range(24)]
    corpus += [DEMO_CRITIQUE] * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def tiny_config(kind: str, tokenizer, **extra):
    """A 2-layer, hidden-64 Qwen2 or Llama config over `tokenizer`'s vocabulary."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra)
    return (tf.Qwen2Config if kind == "qwen2" else tf.LlamaConfig)(**common)


def overfit(model, tokenizer, max_steps: int = 400, log=print):
    """Adam on prompts of random examples (2 or 3 responses, random order) -> DEMO_CRITIQUE + EOS."""
    rng = random.Random(2)
    target = tokenizer(DEMO_CRITIQUE)["input_ids"] + [tokenizer.eos_token_id]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start, below = time.perf_counter(), 0
    for step in range(max_steps):
        rows = []
        for _ in range(4):
            prompt = tokenizer(build_prompt(sentence(rng), [sentence(rng) for _ in range(rng.choice((2, 2, 3)))]))
            rows.append((prompt["input_ids"], target))
        width = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # [B, T], right-padded
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            input_ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
            mask[i, : len(p) + len(t)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        below = below + 1 if loss.item() < 1e-3 else 0
        if below == 3:  # a fixed criterion, not a time limit: the same model on every machine
            break
    log(f"overfit: {step + 1} steps, loss {loss.item():.2e}, {time.perf_counter() - start:.1f} s")
    return model.eval()


def write_jsonl(path, examples) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "query": e.query, "responses": e.responses, "best": e.best,
                                "subset": e.subset}) + "\n")
    return str(path)


def build_demo(root: str, num_examples: int = 16, log=print) -> dict:
    """Tokenizer, overfit GRM checkpoint and data set under `root`; returns their paths."""
    import transformers as tf

    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    model_dir = os.path.join(root, "tiny-grm")
    tokenizer = build_tokenizer(model_dir)
    model = overfit(tf.LlamaForCausalLM(tiny_config("llama", tokenizer)), tokenizer, log=log)
    model.save_pretrained(model_dir)
    data = write_jsonl(os.path.join(root, "data.jsonl"), make_examples(num_examples))
    return {"model": model_dir, "data": data}

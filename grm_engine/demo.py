"""`grm-engine demo`: the DeepSeek-GRM method end to end on a tiny model trained here, in minutes, no download.

The task (grm_engine/demo_task.py): judge two attempts at reversing a word; the GRM names one check (a
principle), works it, and scores. Each check separates only one error type, so the paper's mechanisms are
visible at this size. The pipeline runs every stage through the public entry points:

    task tokenizer + random tiny Llama
    -> train("sft")     on critiques whose principle is drawn at random (learns the format and the checks)
    -> train("rft")     sample from the SFT model, keep the strictly correct critiques (hinted sampling too), SFT
    -> train("grpo")    online GRPO with the +1/-1 rule reward, from the RFT model
    -> train("meta-rm") on the RFT samples (which critiques were correct)
    -> `grm-engine eval` on a held-out split (words never seen in training) for each stage's model, at
       k = 1, 8, 32, with and without the meta RM

and prints one table shaped like the paper's Table 2, the time of every stage, a PNG of accuracy vs k and one
critique per stage. Everything lands in one folder (grm_demo/ by default), checkpoints included, so
`grm-engine score --model grm_demo/grpo/final --meta-rm grm_demo/meta_rm/final ...` works afterwards.
Seeded: the same command prints the same table on the same machine.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch

from .data import Example
from .protocol import build_prompt


@dataclass(frozen=True)
class DemoPreset:
    """Sizes and step counts of one demo run (chosen by measurement: DEMO_PRESETS' comments)."""
    model: str  # demo_task.PRESETS key
    sft_examples: int
    sft_steps: int
    sft_batch: int
    sft_learning_rate: float
    rft_examples: int
    rft_steps: int
    rft_batch: int
    rft_learning_rate: float
    rft_temperature: float  # sampling; at 1.0 most "correct" samples were garbled text ending in the right scores
    grpo_examples: int
    grpo_steps: int
    grpo_prompts: int  # prompts per GRPO step (x grpo_generations rollouts)
    grpo_generations: int
    grpo_learning_rate: float
    grpo_beta: float
    meta_steps: int
    meta_batch: int
    meta_learning_rate: float
    eval_examples: int
    ks: tuple = (1, 8, 32)
    max_tokens: int = 48  # a critique is ~18 tokens


DEMO_PRESETS = {
    # cpu: measured on the 2-core machine under other users' load (the full run's times are in its report)
    "cpu": DemoPreset(model="cpu", sft_examples=2000, sft_steps=300, sft_batch=64, sft_learning_rate=2e-3,
                      rft_examples=1000, rft_steps=60, rft_batch=64, rft_learning_rate=1e-3, rft_temperature=0.6,
                      grpo_examples=1000, grpo_steps=40, grpo_prompts=16, grpo_generations=4,
                      grpo_learning_rate=1e-4, grpo_beta=0.04,
                      meta_steps=100, meta_batch=32, meta_learning_rate=1e-3, eval_examples=200),
    "gpu": DemoPreset(model="gpu", sft_examples=8000, sft_steps=1500, sft_batch=64, sft_learning_rate=1e-3,
                      rft_examples=3000, rft_steps=300, rft_batch=64, rft_learning_rate=5e-4, rft_temperature=0.6,
                      grpo_examples=3000, grpo_steps=200, grpo_prompts=32, grpo_generations=8,
                      grpo_learning_rate=5e-5, grpo_beta=0.04,
                      meta_steps=400, meta_batch=64, meta_learning_rate=5e-4, eval_examples=500),
    # the test lane: the real pipeline at a size that runs in about a minute on 2 CPU cores
    "test": DemoPreset(model="cpu", sft_examples=1200, sft_steps=150, sft_batch=32, sft_learning_rate=3e-3,
                       rft_examples=100, rft_steps=8, rft_batch=32, rft_learning_rate=1e-3, rft_temperature=0.6,
                       grpo_examples=64, grpo_steps=3, grpo_prompts=8, grpo_generations=4,
                       grpo_learning_rate=1e-4, grpo_beta=0.04,
                       meta_steps=8, meta_batch=32, meta_learning_rate=1e-3, eval_examples=50, ks=(1, 8)),
}

STAGES = ("sft", "rft", "grpo")  # the table's rows: the GRM after each training stage
ROW_NAMES = {"sft": "after SFT", "rft": "after RFT", "grpo": "after GRPO"}
MARKER = "demo.json"  # written by the demo: a folder holding it is ours to clear on the next run


class DemoError(Exception):
    """The demo cannot run (e.g. --out-dir holds files that are not ours)."""


def prepare_out_dir(root: str) -> None:
    """A fresh demo each time (training stages would otherwise resume a finished run): clear a folder an earlier
    demo wrote (it holds MARKER); refuse a non-empty folder that is not ours."""
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.isfile(os.path.join(root, MARKER)):
            raise DemoError(f"--out-dir {root} is not empty and was not written by `grm-engine demo` (no {MARKER}); "
                            "give another --out-dir")
        shutil.rmtree(root)
    elif os.path.exists(root) and not os.path.isdir(root):
        raise DemoError(f"--out-dir {root} exists and is not a folder")
    os.makedirs(root)
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump({"status": "running"}, f)


def make_splits(preset: DemoPreset, seed: int) -> dict:
    """Seeded example sets; the held-out words never occur in a training set."""
    from .demo_task import make_task_examples, word_of

    held_out = make_task_examples(preset.eval_examples, seed=seed * 100 + 99)
    unseen = {word_of(e.query) for e in held_out}

    def training(count, offset):
        pool = make_task_examples(2 * count + 100, seed=seed * 100 + offset)
        return [e for e in pool if word_of(e.query) not in unseen][:count]
    return {"sft": training(preset.sft_examples, 1), "rft": training(preset.rft_examples, 2),
            "grpo": training(preset.grpo_examples, 3), "test": held_out}


def train_stages(root: str, preset: DemoPreset, device: str, seed: int, times: dict, log=print) -> dict:
    """init -> sft -> rft -> grpo -> meta-rm under root; -> {stage: final model dir}."""
    from .demo_task import build_initial_model, make_sft_rows, write_examples_jsonl, write_rows_jsonl
    from .train import train

    data = os.path.join(root, "data")
    os.makedirs(data)
    splits = make_splits(preset, seed)
    paths = {name: write_examples_jsonl(os.path.join(data, f"{name}.jsonl"), examples)
             for name, examples in splits.items()}
    paths["sft_rows"] = write_rows_jsonl(os.path.join(data, "sft_rows.jsonl"), make_sft_rows(splits["sft"], seed=seed))
    common = dict(device=device, seed=seed, save_steps=0, logging_steps=25, report_plot=True, max_seq_length=256)
    # measured on the cpu preset (300 SFT steps): a cosine decay without clipping reached greedy 30 / Voting@8 69 /
    # Voting@32 79 % on the held-out split, the constant rate with clipping at 1.0 only 13 / 42 / 48
    supervised = dict(lr_scheduler_type="cosine", warmup_ratio=0.05, max_grad_norm=0.0)

    def stage(name, kind, config):
        tic = time.perf_counter()
        log(f"\n== {name}: train(\"{kind}\") ==")
        result = train(kind, {**common, "output_dir": os.path.join(root, name), **config}, log=log)
        times[name] = time.perf_counter() - tic
        log(f"{name}: {result.steps} steps, {times[name]:.0f} s -> {result.model_dir}")
        return result

    tic = time.perf_counter()
    build_initial_model(os.path.join(root, "init"), preset.model, seed)
    times["init"] = time.perf_counter() - tic
    models = {}
    models["sft"] = stage("sft", "sft", dict(
        **supervised, model=os.path.join(root, "init"), data=paths["sft_rows"], packing=False, max_steps=preset.sft_steps,
        per_device_train_batch_size=preset.sft_batch, learning_rate=preset.sft_learning_rate)).model_dir
    rft = stage("rft", "rft", dict(
        **supervised, model=models["sft"], data=paths["rft"], packing=False, max_steps=preset.rft_steps,
        per_device_train_batch_size=preset.rft_batch, learning_rate=preset.rft_learning_rate,
        temperature=preset.rft_temperature, max_completion_length=preset.max_tokens,
        # no hinted sample: the SFT model never saw a hint line, and measured, 0 of 176 hinted samples it got
        # "right" were well-formed critiques (they start mid-sentence); training on them broke the format
        hinted=False))
    models["rft"] = rft.model_dir
    models["grpo"] = stage("grpo", "grpo", dict(
        model=models["rft"], data=paths["grpo"], max_steps=preset.grpo_steps,
        per_device_train_batch_size=preset.grpo_prompts, num_generations=preset.grpo_generations,
        learning_rate=preset.grpo_learning_rate, beta=preset.grpo_beta,
        max_completion_length=preset.max_tokens, log_completions_steps=max(1, preset.grpo_steps // 4))).model_dir
    models["meta_rm"] = stage("meta_rm", "meta-rm", dict(
        **supervised, model=models["rft"], data=os.path.join(root, "rft", "rft_samples.jsonl"),
        max_steps=preset.meta_steps, per_device_train_batch_size=preset.meta_batch,
        learning_rate=preset.meta_learning_rate)).model_dir
    models["data"] = paths
    models["rft_counts"] = rft.extra.get("rft_counts", {})
    return models


# ---- evaluation: `grm-engine eval` per stage, then the table ----------------------------------------------------
def evaluate_stages(root: str, models: dict, preset: DemoPreset, device: str, seed: int, times: dict,
                    log=print) -> dict:
    """`grm-engine eval` (with the meta RM) of each stage's model on the held-out split -> {stage: results.json}."""
    from .cli import main

    reports = {}
    for stage in STAGES:
        tic = time.perf_counter()
        out_dir = os.path.join(root, "eval", stage)
        argv = ["eval", "--model", models[stage], "--meta-rm", models["meta_rm"], "--data", models["data"]["test"],
                "--k", ",".join(str(k) for k in preset.ks), "--max-tokens", str(preset.max_tokens),
                "--seed", str(seed), "--out-dir", out_dir, "--overwrite", "--device", device,
                "--tie-policy", "strict"]  # the table shows strict accuracy and the tie rate beside it
        log(f"\n== eval {ROW_NAMES[stage]} ==\n$ grm-engine " + " ".join(argv))
        code = main(argv)
        if code:
            raise DemoError(f"grm-engine eval of {models[stage]} failed (exit status {code})")
        with open(os.path.join(out_dir, "results.json")) as f:
            reports[stage] = json.load(f)
        reports[stage]["ties"] = tie_rates(os.path.join(out_dir, "samples.jsonl"), preset.ks)
        reports[stage]["greedy_sample"] = greedy_critique(models[stage], models["data"]["test"], preset, device, seed)
        times[f"eval {stage}"] = time.perf_counter() - tic
    return reports


def tie_rates(samples_path: str, ks) -> dict:
    """Fraction of examples whose top total is tied (all voted samples said 5, 5 or the votes cancel), for
    Voting@k and MetaRM@k, re-voted from eval's samples.jsonl exactly as eval votes (first k samples; the meta
    filter keeps k // 2). Ties are wrong under the strict rule; the paper breaks them at random (half credit
    in expectation for two responses)."""
    from .parsing import ParseStatus
    from .voting import vote

    with open(samples_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    scores = torch.tensor([[[float("nan") if v is None else v for v in s["scores"]] for s in r["samples"]]
                           for r in rows])  # [G, k, 2], original order
    status = torch.tensor([[ParseStatus[s["status"]].value for s in r["samples"]] for r in rows], dtype=torch.int8)
    meta = torch.tensor([[float("nan") if s["meta"] is None else s["meta"] for s in r["samples"]] for r in rows])
    out = {}
    for k in ks:
        for name, kwargs in ((f"Voting@{k}", {}), (f"MetaRM@{k}", dict(meta=meta[:, :k], k_meta=max(1, k // 2)))):
            result = vote(scores[:, :k], status[:, :k], **kwargs)
            voted = result.used.any(dim=1)
            out[name] = float(((result.best == -1) & voted).float().mean())
    return out


def greedy_critique(model_dir: str, data: str, preset: DemoPreset, device: str, seed: int) -> dict:
    """The greedy critique of the first held-out example (responses in their given order) and the greedy tie rate."""
    from .data import load_examples
    from .grm import GRM

    examples = list(load_examples(data))
    grm = GRM.from_pretrained(model_dir, device=device)
    first = grm.score(examples[:1], k=1, temperature=0.0, shuffle=False, max_tokens=preset.max_tokens).examples[0]
    greedy = grm.score(examples, k=1, temperature=0.0, seed=seed, max_tokens=preset.max_tokens)  # as eval runs it
    tied = sum(1 for e in greedy.examples if e.best == -1 and e.samples[0].status == "OK")
    right = sum(1 for e, x in zip(greedy.examples, examples) if e.best == x.best)
    return {"example": {"query": examples[0].query, "responses": examples[0].responses, "best": examples[0].best},
            "critique": first.samples[0].text, "tie_rate": tied / len(examples), "strict": right / len(examples)}


def table_columns(ks) -> list[tuple[str, str]]:
    """(results.json method, column title) in the paper's Table 2 order."""
    columns = [("Greedy", "greedy"), ("Voting@1", "1 x T=0.5")]
    columns += [(f"Voting@{k}", f"Voting@{k}") for k in ks if k > 1]
    columns += [(f"MetaRM@{k}", f"MetaRM@{k}") for k in ks if k > 1]
    return columns


def format_table(reports: dict, ks) -> str:
    """Strict accuracy (%) per stage and method, then the tie rates and the random-tie-break accuracy."""
    columns = table_columns(ks)
    width = max(len(title) for _, title in columns) + 2

    def ties(report, method):
        return report["greedy_sample"]["tie_rate"] if method == "Greedy" else report["ties"][method]
    lines = []
    for caption, cell in (
            ("strict accuracy % (a tied top counts as wrong; paper Eq. 10)",
             lambda r, m: 100 * r["methods"][m]["accuracy"]),
            ("tie rate % (examples whose top total is tied)", lambda r, m: 100 * ties(r, m)),
            ("accuracy % with the paper's random tie break (expected value: strict + ties / 2)",
             lambda r, m: 100 * (r["methods"][m]["accuracy"] + ties(r, m) / 2))):
        lines.append(caption)
        lines.append("".ljust(12) + "".join(title.rjust(width) for _, title in columns))
        for stage, report in reports.items():
            lines.append(ROW_NAMES[stage].ljust(12) + "".join(f"{cell(report, m):.1f}".rjust(width) for m, _ in columns))
        lines.append("")
    return "\n".join(lines)


def plot_accuracy_vs_k(path: str, reports: dict, ks, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (stage, report), color in zip(reports.items(), ("tab:blue", "tab:orange", "tab:green")):
        methods = report["methods"]
        ax.plot(ks, [100 * methods[f"Voting@{k}"]["accuracy"] for k in ks], "o-", color=color,
                label=f"{ROW_NAMES[stage]}: voting")
        ax.plot(ks, [100 * methods[f"MetaRM@{k}"]["accuracy"] for k in ks], "s--", color=color,
                label=f"{ROW_NAMES[stage]}: meta RM")
        ax.axhline(100 * methods["Greedy"]["accuracy"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k (sampled critiques, T = 0.5); dotted: greedy")
    ax.set_ylabel("strict accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def run_demo(root: str = "grm_demo", preset: str | DemoPreset = "cpu", device: str = "cpu", seed: int = 0,
             threads: int | None = None, log=print) -> dict:
    """The whole demo under `root`; prints the table and returns {"table", "reports", "times", "models", ...}."""
    settings = DEMO_PRESETS[preset] if isinstance(preset, str) else preset
    if threads:
        torch.set_num_threads(threads)
    began, began_cpu = time.perf_counter(), time.process_time()
    prepare_out_dir(root)
    times: dict = {}
    models = train_stages(root, settings, device, seed, times, log=log)
    reports = evaluate_stages(root, models, settings, device, seed, times, log=log)
    times["total"] = time.perf_counter() - began
    times["total_cpu"] = time.process_time() - began_cpu  # this process's CPU seconds: the wall time on a shared machine includes waiting
    table = format_table(reports, settings.ks)
    plot = plot_accuracy_vs_k(os.path.join(root, "accuracy_vs_k.png"), reports, settings.ks,
                              f"demo task, {settings.eval_examples} held-out examples, seed {seed}")
    log("\n" + "=" * 100)
    log(f"grm-engine demo: reverse-a-word judgements, {settings.eval_examples} held-out examples "
        f"(words unseen in training), meta RM keeps k // 2 of k samples\n")
    log(table)
    log("one greedy critique per stage, first held-out example: " + json.dumps(reports["sft"]["greedy_sample"]["example"]))
    for stage, report in reports.items():
        log(f"  {ROW_NAMES[stage]}:" + report["greedy_sample"]["critique"].replace("\n", "\n      "))
    counts = models["rft_counts"]
    log(f"\nRFT kept {counts.get('kept', 0)} + {counts.get('kept_hinted', 0)} hinted of {counts.get('samples', 0)} "
        f"samples ({counts.get('dropped_too_easy', 0)} of {counts.get('examples', 0)} examples dropped as too easy)")
    log("times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in times.items() if name != "total_cpu"))
    log(plot)
    log(f"models: {', '.join(models[s] for s in (*STAGES, 'meta_rm'))}")
    summary = {"status": "done", "preset": asdict(settings), "device": device, "seed": seed, "times": times,
               "table": {stage: {m: r["methods"][m]["accuracy"] for m, _ in table_columns(settings.ks)}
                         for stage, r in reports.items()},
               "ties": {stage: {"Greedy": r["greedy_sample"]["tie_rate"], **r["ties"]} for stage, r in reports.items()},
               "critiques": {stage: r["greedy_sample"] for stage, r in reports.items()},
               "rft_counts": counts, "models": {s: models[s] for s in (*STAGES, "meta_rm")}}
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"total time: {times['total']:.0f} s ({times['total'] / 60:.1f} min; {times['total_cpu']:.0f} CPU s); "
        f"summary: {os.path.join(root, MARKER)}")
    return {**summary, "text_table": table, "reports": reports}


# ---- the earlier demo's fixtures: the tests build their overfit models with these -------------------------------
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

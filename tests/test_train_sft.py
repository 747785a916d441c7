"""The SFT loss (grm_engine.train.sft / losses / batches) on a tiny Qwen2 on the CPU.

References are independent of the code under test: transformers' own forward (its lm_head, full logits) on each
row alone, with PyTorch's cross-entropy over the completion tokens; gradients from autograd on that reference.
"""
import copy
import json

import pytest
import torch

from grm_engine.train import train
from grm_engine.train.batches import Row, collate, model_attention_mask
from grm_engine.train.engine import Engine
from grm_engine.loss import softcap_logits
from grm_engine.train.losses import final_logit_softcap, plain_completion_nll_sum
from grm_engine.train.sft import read_prompt_completion, sft_micro_loss, tokenize_rows
from train_helpers import few_threads, read_metrics, sft_settings, write_sft_data  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("sft_data") / "sft.jsonl", count=8, seed=1)


@pytest.fixture(params=["qwen2", "llama", "gemma2"])
def model(base, tokenizer, request):
    """The saved tiny Qwen2, or a tiny random-init Llama (no attention biases) or Gemma 2 (final logits soft-capped
    at 2, small enough to change every log-prob) over the same tokenizer."""
    import transformers as tf

    if request.param == "qwen2":
        return tf.AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa").train()
    if request.param == "gemma2":
        torch.manual_seed(2)
        config = tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), query_pre_attn_scalar=8,
                                 sliding_window=512, final_logit_softcapping=2.0, attn_logit_softcapping=None,
                                 attn_implementation="eager")
        return tf.Gemma2ForCausalLM(config).train()
    torch.manual_seed(1)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), tie_word_embeddings=False,
                            attn_implementation="sdpa")
    return tf.LlamaForCausalLM(config).train()


@pytest.fixture(scope="module")
def rows(data, tokenizer) -> list[Row]:
    return tokenize_rows(read_prompt_completion(data), tokenizer, max_seq_length=256)


def reference_nll(model, rows: list[Row]) -> torch.Tensor:
    """Sum over rows of PyTorch's cross-entropy on the completion tokens, each row run alone (no mask, no pad)."""
    total = 0.0
    for row in rows:
        ids = torch.tensor([row.prompt_ids + row.completion_ids])  # [1, L]
        logits = model(input_ids=ids).logits[0]  # [L, V]
        start = len(row.prompt_ids) - 1  # position start predicts the first completion token
        total = total + torch.nn.functional.cross_entropy(logits[start:start + len(row.completion_ids)].float(),
                                                          torch.tensor(row.completion_ids), reduction="sum")
    return total


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rtol=1e-4, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_rows_end_with_eos_and_keep_prompt_out_of_the_loss(rows, tokenizer):
    for row in rows:
        assert row.completion_ids[-1] == tokenizer.eos_token_id
    batch = collate(rows, 256, packing=False)
    assert batch.num_target_tokens == sum(len(r.completion_ids) for r in rows)
    for s, row in enumerate(rows):
        targets = batch.target_ids[s][batch.loss_mask[s]].tolist()
        assert targets == row.completion_ids


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sft_loss_equals_masked_cross_entropy(model, rows, backend, monkeypatch):
    """sft_micro_loss (fused lm_head + NLL through fused_linear_grpo_loss; "triton": the kernels under Triton's
    interpreter) equals PyTorch cross-entropy on transformers' logits: value and gradients."""
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    if backend == "triton":
        pytest.importorskip("triton")
    reference_model = copy.deepcopy(model)
    want = reference_nll(reference_model, rows)
    want.backward()

    batch = collate(rows, 256, packing=False)  # right-padded, one row per sequence
    loss, stats = sft_micro_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(float(stats["loss_sum"])), want.detach(), rtol=1e-5, atol=1e-4)
    assert stats["completion_tokens"] == sum(len(r.completion_ids) for r in rows)
    # soft-capping's chain rule (1 - tanh^2) is applied to a chunk in another order than autograd: fp32 rounding
    assert_grads_close(grads(model), grads(reference_model), atol=5e-6 if final_logit_softcap(model) else 1e-6)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0  # (Gemma 2 ties it to the embeddings)


def test_plain_reference_matches_per_row_cross_entropy(model, rows):
    """losses.plain_completion_nll_sum on the padded batch's full logits is the same reference."""
    batch = collate(rows, 256, packing=False)
    logits = model(input_ids=batch.input_ids, attention_mask=model_attention_mask(model, batch.attention_mask),
                   position_ids=batch.position_ids).logits  # [S, L, V]
    with torch.no_grad():
        torch.testing.assert_close(plain_completion_nll_sum(logits, batch.target_ids, batch.loss_mask),
                                   reference_nll(model, rows), rtol=1e-5, atol=1e-4)


def test_packing_keeps_rows_apart(model, rows):
    """Packed sequences (block-diagonal mask, positions restarting per row) give every row the logits it gets
    alone, and the same loss and gradients as the unpacked batch."""
    longest = max(len(r) for r in rows)
    packed = collate(rows, max_seq_length=3 * longest, packing=True)
    assert packed.input_ids.shape[0] < len(rows) // 2  # rows do share sequences
    with torch.no_grad():
        body = model.get_decoder()
        hidden = body(input_ids=packed.input_ids, attention_mask=model_attention_mask(model, packed.attention_mask),
                      position_ids=packed.position_ids).last_hidden_state  # [S, L, H]
        logits = softcap_logits(model.lm_head(hidden), final_logit_softcap(model))  # [S, L, V], as the model's own
        for i, row in enumerate(rows):
            s, end = packed.last_positions[i]
            start = end - len(row) + 1
            assert packed.input_ids[s, start:end + 1].tolist() == row.prompt_ids + row.completion_ids
            alone = model(input_ids=torch.tensor([row.prompt_ids + row.completion_ids])).logits[0]  # [L, V]
            torch.testing.assert_close(logits[s, start:end + 1], alone, rtol=1e-5, atol=1e-5)

    unpacked_model = copy.deepcopy(model)
    loss_packed, _ = sft_micro_loss(model, packed)
    loss_packed.backward()
    loss_unpacked, _ = sft_micro_loss(unpacked_model, collate(rows, 256, packing=False))
    loss_unpacked.backward()
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-4)
    assert_grads_close(grads(model), grads(unpacked_model))


def test_packing_mask_blocks_other_rows(rows):
    """Changing one row's tokens changes no other row's logits."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=512)
    model = tf.Qwen2ForCausalLM(config).eval()
    first, second = rows[0], rows[1]
    changed = Row([(t + 7) % 500 + 3 for t in first.prompt_ids], first.completion_ids)
    out = []
    for a in (first, changed):
        batch = collate([a, second], max_seq_length=512, packing=True)
        assert batch.input_ids.shape[0] == 1
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=model_attention_mask(model, batch.attention_mask),
                           position_ids=batch.position_ids).logits[0]
        out.append(logits[len(a):len(a) + len(second)])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(base, data, rows, tmp_path, monkeypatch):
    """One optimizer step over the same 8 rows: 1 x 8, 2 x 4 and 4 x 2 micro-batches give the same gradients
    (the reference's: cross-entropy summed over all rows / completion tokens), loss and grad norm."""
    captured = []
    step = Engine.step

    def capture(self):
        captured.append({n: p.grad.clone() for n, p in self.module.named_parameters()})
        return step(self)

    monkeypatch.setattr(Engine, "step", capture)
    runs = {}
    for accumulation, batch_size in ((1, 8), (2, 4), (4, 2)):
        settings = sft_settings(base, data, tmp_path / f"gas{accumulation}", max_steps=1, save_steps=0,
                                per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                packing=accumulation != 2)  # packed and padded micro-batches alike
        train("sft", settings, log=lambda *a: None)
        runs[accumulation] = (captured[-1], read_metrics(tmp_path / f"gas{accumulation}")[0])

    import transformers as tf

    reference = tf.AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    tokens = sum(len(r.completion_ids) for r in rows)
    want = reference_nll(reference, rows) / tokens
    want.backward()
    for accumulation, (got, metrics) in runs.items():
        assert metrics["step"] == 1
        assert metrics["loss"] == pytest.approx(want.item(), rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(runs[1][1]["grad_norm"], rel=1e-5)
        assert_grads_close(got, grads(reference))
    with open(tmp_path / "gas2" / "config.yaml") as f:
        assert "gradient_accumulation_steps: 2" in f.read()
    assert json.dumps(runs[2][1])  # the logged row is plain JSON


def test_gemma2_checkpoint_trains_and_a_row_past_its_window_is_refused(tokenizer, data, tmp_path):
    """`train sft` on a Gemma 2 checkpoint (no SDPA in transformers: loaded with eager attention, fed additive
    masks, its final soft-capping in the loss): the first step's loss is the per-row cross-entropy of the model's
    own logits. A checkpoint whose sliding window is shorter than a row is refused before any weights load."""
    import transformers as tf

    from grm_engine.train import ConfigError, train
    from train_helpers import read_metrics, sft_settings

    def save(window):
        path = tmp_path / f"gemma2_w{window}"
        config = tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), query_pre_attn_scalar=8,
                                 sliding_window=window, final_logit_softcapping=0.05, max_position_embeddings=1024,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(4)
        tf.Gemma2ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)

    good = save(512)
    settings = sft_settings(good, data, tmp_path / "out", max_steps=1, per_device_train_batch_size=8,
                            gradient_accumulation_steps=1, save_steps=0, learning_rate=1e-5)
    train("sft", settings, log=lambda *a: None)
    model = tf.AutoModelForCausalLM.from_pretrained(good, attn_implementation="eager")
    rows = tokenize_rows(read_prompt_completion(data), tokenizer, max_seq_length=settings.get("max_seq_length", 2048))
    first = read_metrics(tmp_path / "out")[0]
    tokens = sum(len(r.completion_ids) for r in rows[:8])
    want = float(reference_nll(model, rows[:8])) / tokens
    model.config.final_logit_softcapping = None
    uncapped = float(reference_nll(model, rows[:8])) / tokens  # what a loss that ignored the cap would give
    assert abs(first["loss"] - want) < abs(uncapped - want) / 20, (first["loss"], want, uncapped)

    short = save(8)
    with pytest.raises(ConfigError, match="sliding window of 8 tokens"):
        train("sft", dict(settings, model=short, output_dir=str(tmp_path / "short")), log=lambda *a: None)
    assert not (tmp_path / "short" / "checkpoint-1").exists()

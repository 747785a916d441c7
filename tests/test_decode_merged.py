"""Merged q/k/v and gate/up projections (one GEMM each): same tokens as separate ones; a checkpoint's weights
become views of the merged tensors; a live model's merged copies follow its weights between generate calls."""
import torch

from grm_engine.decode import Decoder, SamplingParams
from test_decode_models import make_prompts, tiny_model

PARAMS = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True)


def run(decoder):
    return [[(s.token_ids, s.logprobs) for s in r.outputs] for r in decoder.generate(make_prompts()[:3], PARAMS, use_tqdm=False)]


def close(a, b):
    assert [[t for t, _ in r] for r in a] == [[t for t, _ in r] for r in b]
    for ra, rb in zip(a, b):
        for (_, la), (_, lb) in zip(ra, rb):
            torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=1e-4)


def test_checkpoint_weights_become_views_of_the_merged_tensors(tmp_path):
    model = tiny_model("qwen2", seed=2)
    model.save_pretrained(tmp_path)
    merged = Decoder.from_pretrained(str(tmp_path), num_kv_blocks=128, block_size=4)
    separate = Decoder.from_pretrained(str(tmp_path), num_kv_blocks=128, block_size=4, merge_projections=False)
    weights = merged.model.weights
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    assert weights["model.layers.0.self_attn.k_proj.weight"].data_ptr() == qkv[model.config.hidden_size:].data_ptr()
    assert "model.layers.1.mlp.gate_up_proj.weight" in weights and "model.layers.1.self_attn.qkv_proj.bias" in weights
    assert "model.layers.0.self_attn.qkv_proj.weight" not in separate.model.weights
    close(run(merged), run(separate))


def test_live_model_merged_copies_follow_its_weights():
    model = tiny_model("llama", seed=3)
    decoder = Decoder.from_pretrained(model, num_kv_blocks=128, block_size=4)  # a tiny model: merged copies
    assert decoder.model.merged_from, "expected merged copies for a small live model"
    before = run(decoder)
    with torch.no_grad():  # a training step changes the policy in place
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-1.5)
            layer.mlp.up_proj.weight.add_(0.2)
    after = run(decoder)
    fresh = run(Decoder.from_pretrained(model, num_kv_blocks=128, block_size=4, merge_projections=False))
    close(after, fresh)
    assert after != before

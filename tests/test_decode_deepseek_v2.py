"""DeepSeek-V2 in the decoder vs transformers' DeepseekV2ForCausalLM: greedy tokens equal token for token on tiny
random-init models (MLA with and without q_lora, YaRN with its attention scale, greedy and group-limited MoE routing,
shared experts, a dense first layer), from a live module and from a safetensors folder; the latent cache's size,
prefix sharing, copy-on-write and preemption. The MLA decode kernel and the latent store against their references.
"""
import pytest
import torch

import grm_engine.decode.models.deepseek_v2 as deepseek_v2
from grm_engine.decode import Decoder, SamplingParams
from grm_engine.decode.model_runner import ModelRunner
from test_decode_models import EOS, check_greedy_matches_transformers, hf_greedy, make_prompts

NEW_TOKENS = 16


def tiny_config(variant: str = "lite"):
    import transformers as tf

    config = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=384,
                  max_position_embeddings=256, initializer_range=0.2, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
                  tie_word_embeddings=False, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, moe_intermediate_size=24,
                  first_k_dense_replace=1, routed_scaling_factor=1.5, topk_method="greedy", norm_topk_prob=False)
    if variant == "yarn-grouped":  # q_lora, YaRN (mscale on the softmax scale), group-limited routing
        config.update(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                       "mscale_all_dim": 0.707, "original_max_position_embeddings": 64})
    return tf.DeepseekV2Config(**config)


def tiny_model(variant: str = "lite", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(variant), attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at ones; make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture
def routing_probe(monkeypatch):
    """Records the expert ids of every routed-experts call (to check the cases the test must cover)."""
    calls = []
    original = deepseek_v2.routed_experts

    def probe(x, ids, *args):
        calls.append(ids.clone())
        return original(x, ids, *args)

    monkeypatch.setattr(deepseek_v2, "routed_experts", probe)
    return calls


@pytest.mark.parametrize("variant", ["lite", "yarn-grouped"])
def test_greedy_matches_transformers(variant, routing_probe):
    model = tiny_model(variant)
    check_greedy_matches_transformers(model, variant, NEW_TOKENS)
    # the routed steps include one where several tokens share an expert while another expert has no token
    num_experts = model.config.n_routed_experts
    counts = [torch.bincount(ids.flatten(), minlength=num_experts) for ids in routing_probe]
    assert any(bool((c > 1).any() and (c == 0).any()) for c in counts)


def run_greedy(decoder, prompts, params):
    return [[o.token_ids for o in out.outputs] for out in decoder.generate(prompts, params, use_tqdm=False)]


def test_load_from_safetensors_dir_per_expert_and_stacked(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("yarn-grouped", seed=3)
    released = tmp_path / "released"
    model.save_pretrained(released)  # one tensor per expert (mlp.experts.N.gate_proj.weight), as released checkpoints
    stacked = tmp_path / "stacked"  # transformers' in-memory layout ([E, 2I, H] gate_up, [E, H, I] down)
    model.config.save_pretrained(stacked)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stacked / "model.safetensors"))
    from safetensors.torch import load_file

    from grm_engine.grm import check_checkpoint_weights

    for folder in (released, stacked):
        check_checkpoint_weights(str(folder))  # from the safetensors headers alone, before any weight loads
    broken = tmp_path / "broken"  # a released layout that lacks one expert's tensor: named before loading
    model.config.save_pretrained(broken)
    tensors = load_file(str(released / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="experts.5.up_proj"):
        check_checkpoint_weights(str(broken))
    with pytest.raises(ValueError, match="experts.5.up_proj"):
        Decoder.from_pretrained(str(broken), device="cpu", dtype=torch.float32, num_kv_blocks=8)
    prompts = make_prompts(seed=4)[:2]
    expected = [[hf_greedy(model, prompt, 10)] for prompt in prompts]
    for folder in (released, stacked):
        decoder = Decoder.from_pretrained(str(folder), device="cpu", dtype=torch.float32, num_kv_blocks=64, block_size=8)
        assert decoder.model.weights["model.layers.1.mlp.gate.weight"].dtype == torch.float32
        assert run_greedy(decoder, prompts, SamplingParams(temperature=0, max_tokens=10)) == expected, folder.name


def test_latent_cache_holds_one_row_per_token_and_layer():
    model = tiny_model("lite")
    decoder = Decoder.from_pretrained(model, num_kv_blocks=16, block_size=4)
    config = model.config
    row = config.kv_lora_rank + config.qk_rope_head_dim
    assert ModelRunner.kv_bytes_per_block(decoder.model, 4) == config.num_hidden_layers * 4 * row * 4  # fp32
    assert tuple(decoder.runner.kv_cache.shape) == (1, config.num_hidden_layers, 16, 4, 1, row)


def test_forked_samples_under_preemption_match_transformers_and_a_roomy_pool():
    """n sampled continuations fork the prompt's latent blocks (the shared partial block is copied on write, then
    each sample writes its own rows); a tiny pool preempts and recomputes. Every sampled token's log-prob equals
    transformers' on the same text (a sample reading another's rows would not), and the tiny pool's samples equal
    the roomy pool's."""
    model = tiny_model("lite", seed=2)
    prompts = [list(range(5, 40)), list(range(50, 60)), list(range(70, 101))]  # 35, 10, 31 tokens: partial blocks
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=0, logprobs=True)
    roomy = Decoder.from_pretrained(model, num_kv_blocks=256, block_size=4).generate(prompts, params, use_tqdm=False)
    small = Decoder.from_pretrained(model, num_kv_blocks=22, block_size=4)
    squeezed = small.generate(prompts, params, use_tqdm=False)
    assert small.stats.preemptions > 0
    small.block_manager.check_invariants([])
    for prompt, request, other in zip(prompts, roomy, squeezed):
        assert [s.token_ids for s in request.outputs] == [s.token_ids for s in other.outputs]
        assert len({tuple(s.token_ids) for s in request.outputs}) > 1  # the samples differ: each has its own rows
        for sample in request.outputs:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + sample.token_ids])).logits[0, len(prompt) - 1:-1]
            expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=2e-5, rtol=1e-5)


def test_shared_prefix_path_matches_private_path(monkeypatch):
    """Samples of a long prompt take the shared-prefix MLA path (rows regrouped, padded work lists, the padded graph
    step run eagerly): greedy and sampled tokens (and log-probs) equal the private path's (the per-sequence MLA
    kernel); a short prompt in the same batch stays on the suffix-only path. The MLA store and decode run the Triton
    kernels under the interpreter (the rest of the model its reference ops, for time); the crossover thresholds
    are lowered so that small shapes take the path."""
    import grm_engine.decode.models.mla as mla
    from grm_engine.decode.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(mla, "attention_backend", lambda device: "triton")
    model = tiny_model("lite", seed=5)
    g = torch.Generator().manual_seed(2)
    prompts = [list(range(20, 27)), torch.randint(4, 384, (70,), generator=g).tolist()]
    kwargs = dict(num_kv_blocks=128, block_size=4, max_num_seqs=16, num_scheduler_steps=1)
    private = Decoder.from_pretrained(model, cascade_attention=False, **kwargs)
    shared = Decoder.from_pretrained(model, **kwargs)
    assert shared.runner.cascade, "DeepSeek-V2 should take the shared-prefix path"
    shared.runner.graphs = DecodeGraphs(shared.model, shared.runner.layer_caches, 4, 16, enabled=False)
    shared.runner.cascade_thresholds = dict(min_prefix_tokens=32, min_samples=4)
    for params in (SamplingParams(n=4, temperature=0, max_tokens=3, ignore_eos=True, logprobs=True),
                   SamplingParams(n=5, temperature=0.9, max_tokens=3, seed=3, ignore_eos=True, logprobs=True)):
        ours = shared.generate(prompts, params, use_tqdm=False)
        ref = private.generate(prompts, params, use_tqdm=False)
        assert [[s.token_ids for s in r.outputs] for r in ours] == [[s.token_ids for s in r.outputs] for r in ref]
        for r_ours, r_ref in zip(ours, ref):
            for a, b in zip(r_ours.outputs, r_ref.outputs):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
    assert any(key.cascade is not None for key in shared.runner.graphs.buffers), "the shared-prefix path did not run"


def test_norm_topk_prob_normalizes_instead_of_scaling():
    from grm_engine.decode.models.moe import Router

    config = tiny_config("lite")
    x, gate = torch.randn(9, 64), torch.randn(8, 64)
    scaled_ids, scaled = Router(config)(x, gate)
    config.norm_topk_prob = True
    ids, weights = Router(config)(x, gate)
    probs = torch.softmax(x @ gate.T, dim=-1)
    assert torch.equal(ids, scaled_ids) and torch.equal(ids.sort(-1).values, probs.topk(3).indices.sort(-1).values)
    torch.testing.assert_close(scaled, probs.gather(1, ids) * 1.5)
    torch.testing.assert_close(weights, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))


def test_unsupported_settings_are_named():
    model = tiny_model("lite")
    model.config.topk_method = "noaux_tc"
    with pytest.raises(NotImplementedError, match="noaux_tc"):
        Decoder.from_pretrained(model, num_kv_blocks=8)
    model = tiny_model("lite")
    model.config.n_group, model.config.topk_group, model.config.topk_method = 3, 1, "group_limited_greedy"
    with pytest.raises(ValueError, match="n_group=3"):
        Decoder.from_pretrained(model, num_kv_blocks=8)


# ---------------------------------------------------------------------------------------------- kernels (interpreter)
def random_pages(num_seqs, context_lens, block_size, row, dtype=torch.float32, seed=0):
    """A cache [num_blocks, block_size, 1, row] with each sequence's pages at random places (shuffled pool)."""
    g = torch.Generator().manual_seed(seed)
    tables = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(tables) + 3
    cache = torch.randn(num_blocks, block_size, 1, row, generator=g).to(dtype)
    pool = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(num_seqs, max(tables), dtype=torch.int32)
    for b, n in enumerate(tables):
        block_tables[b, :n] = torch.tensor([pool.pop() for _ in range(n)])
    return cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_decode_kernel_matches_reference(num_splits):
    from grm_engine.decode.models.mla import mla_decode_reference
    from grm_engine.kernels.mla_attention import mla_decode_attention

    heads, latent, rope, block_size = 5, 24, 8, 4  # odd sizes: masks on every axis
    context_lens = [1, 7, 33, 70]
    cache, tables, lens = random_pages(len(context_lens), context_lens, block_size, latent + rope)
    q = torch.randn(len(context_lens), heads, latent + rope)
    expected = mla_decode_reference(q, cache, tables, lens, 0.3, latent)
    out = mla_decode_attention(q, cache, tables, lens, 0.3, latent, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_mla_decode_reference_equals_expanded_attention():
    """Absorbing W_uk into the query and W_uv into the output is the same attention as expanding K and V."""
    from grm_engine.decode.attention import attend_contiguous
    from grm_engine.decode.models.mla import mla_decode_reference

    heads, latent, rope, nope, v_dim, n = 3, 16, 8, 12, 10, 11
    cache, tables, lens = random_pages(1, [n], 4, latent + rope)
    w_uk, w_uv = torch.randn(heads, nope, latent), torch.randn(heads, v_dim, latent)
    q_nope, q_rope = torch.randn(heads, nope), torch.randn(heads, rope)
    rows = cache[tables[0].long()].flatten(0, 2)[:n]  # [n, latent + rope]
    keys = torch.cat((torch.einsum("hdr,tr->thd", w_uk, rows[:, :latent]), rows[:, None, latent:].expand(n, heads, rope)), -1)
    values = torch.einsum("hdr,tr->thd", w_uv, rows[:, :latent])
    expanded = attend_contiguous(torch.cat((q_nope, q_rope), -1)[None], keys, values, n - 1, 0.2)[0]  # [H, v_dim]
    absorbed_q = torch.cat((torch.einsum("hd,hdr->hr", q_nope, w_uk), q_rope), -1)[None]
    latent_out = mla_decode_reference(absorbed_q, cache, tables, lens, 0.2, latent)[0]
    torch.testing.assert_close(torch.einsum("hr,hdr->hd", latent_out, w_uv), expanded)


def test_store_latent_kernel_matches_reference_and_skips_padding():
    from grm_engine.decode.models.mla import store_latent_reference
    from grm_engine.kernels.mla_attention import store_latent_triton

    cache = torch.randn(6, 4, 1, 40)
    expected = cache.clone()
    latent = torch.randn(5, 40)
    slots = torch.tensor([3, 17, -1, 0, 22])
    store_latent_triton(latent, cache, slots)
    store_latent_reference(latent[slots >= 0], expected, slots[slots >= 0])
    assert torch.equal(cache, expected)


# ---------------------------------------------------------------------------------------------- GPU lane (bf16)
def medium_model():
    import transformers as tf

    config = tf.DeepseekV2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                 vocab_size=4096, max_position_embeddings=4096, initializer_range=0.05, eos_token_id=3,
                                 kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                 v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                                 moe_intermediate_size=256, first_k_dense_replace=1, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().eval()


@pytest.mark.gpu
def test_bf16_first_step_logits_and_greedy_against_transformers(monkeypatch):
    """First-step logits within 2x transformers' own bf16 error of fp32; every greedy token (decode steps: CUDA graphs,
    the MLA kernel, the fused MoE) is fp32's best or a near tie."""
    import copy

    from decode_helpers import check_bf16_first_step_and_greedy, medium_prompts

    model32 = medium_model()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    for name, param in model16.named_parameters():  # the router stays fp32, as from_pretrained keeps it
        if name.endswith("mlp.gate.weight"):
            param.data = param.data.float()
    prompts = medium_prompts()
    outputs = check_bf16_first_step_and_greedy(model32, model16, prompts, monkeypatch)
    # the same padded steps without CUDA graphs: the same tokens, bit for bit
    eager = Decoder.from_pretrained(model16, num_kv_blocks=2048, block_size=16, cuda_graphs=False)
    eager_outputs = eager.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in eager_outputs] == [o.outputs[0].token_ids for o in outputs]


@pytest.mark.gpu
def test_shared_prefix_close_to_private_gpu():
    """bf16, CUDA graphs: the 1,300-token prompt's 8 samples take the shared-prefix MLA path; greedy log-probs match
    the private path's up to bf16 rounding wherever the tokens still agree (a near tie may flip a later token)."""
    from decode_helpers import medium_prompts

    model = medium_model().to(torch.bfloat16)
    for name, param in model.named_parameters():  # the router stays fp32, as from_pretrained keeps it
        if name.endswith("mlp.gate.weight"):
            param.data = param.data.float()
    params = SamplingParams(n=8, temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=True)
    shared = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048, block_size=16)
    shared.runner.cascade_thresholds = dict(min_prefix_tokens=1024)  # the default (2,048) is above this prompt
    private = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048, block_size=16, cascade_attention=False)
    ours = shared.generate(medium_prompts(), params, use_tqdm=False)
    ref = private.generate(medium_prompts(), params, use_tqdm=False)
    assert any(key.cascade is not None for key in shared.runner.graphs.buffers), "the shared-prefix path did not run"
    for r_ours, r_ref in zip(ours, ref):
        for a, b in zip(r_ours.outputs, r_ref.outputs):
            same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(b.token_ids))
            assert same >= 4, f"tokens diverge at {same}"
            torch.testing.assert_close(torch.tensor(a.logprobs[:same]), torch.tensor(b.logprobs[:same]), atol=0.05, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_mla_decode_kernel_bf16_at_deepseek_v2_lite_shape(num_splits):
    """16 heads, kv_lora_rank 512, rope 64: error against fp32 at most 2x that of the same math in bf16 PyTorch."""
    from grm_engine.decode.models.mla import mla_decode_reference
    from grm_engine.kernels.mla_attention import mla_decode_attention

    context_lens = [1, 17, 300, 1000, 2049, 2500]
    cache, tables, lens = random_pages(len(context_lens), context_lens, 16, 576)
    q = torch.randn(len(context_lens), 16, 576)
    cache, tables, lens, q = cache.cuda(), tables.cuda(), lens.cuda(), q.cuda()
    scale = 192 ** -0.5
    exact = mla_decode_reference(q, cache, tables, lens, scale, 512).double()
    # the same math in bf16 (scores and probabilities rounded to bf16 as a plain PyTorch bf16 run would)
    rows = cache.bfloat16()[tables.long()].flatten(1, 3)  # [B, max_len, 576]
    scores = torch.einsum("bhd,btd->bht", q.bfloat16(), rows).float() * scale
    visible = torch.arange(rows.shape[1], device="cuda")[None, :] < lens.long()[:, None]
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), -1).bfloat16()
    reference_error = (torch.einsum("bht,btr->bhr", probs, rows[..., :512]).double() - exact).abs().max()
    out = mla_decode_attention(q.bfloat16(), cache.bfloat16(), tables, lens, scale, 512, num_splits=num_splits)
    assert (out.double() - exact).abs().max() <= 2 * reference_error

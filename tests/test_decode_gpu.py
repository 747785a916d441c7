"""GPU lane (bf16): first-step logits against transformers, greedy agreement, same sampling noise as the CPU."""
import copy

import pytest
import torch

from decode_helpers import check_bf16_first_step_and_greedy
from decode_helpers import medium_prompts
from grm_engine.decode import Decoder, SamplingParams

pytestmark = pytest.mark.gpu
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2"]


def medium_model(family: str):
    import transformers as tf

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=4096, max_position_embeddings=4096, initializer_range=0.05, eos_token_id=3)
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=64),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=256),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=256),
    }[family]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_logits_and_greedy_bf16(family, monkeypatch):
    model32 = medium_model(family)
    check_bf16_first_step_and_greedy(model32, copy.deepcopy(model32).to(torch.bfloat16), medium_prompts(), monkeypatch,
                                     label=family)


def test_sampling_noise_identical_on_cpu_and_gpu():
    from grm_engine.decode.sampler import uniform_noise

    keys = torch.tensor([[2**62 + 5, 3, 7, 1000], [0, 0, 0, 0], [123456789, 99, 31, 4095]])
    assert torch.equal(uniform_noise(keys, 152064), uniform_noise(keys.cuda(), 152064).cpu())


def test_seeded_sampling_same_on_gpu_alone_and_batched():
    """Same batch shape, other companions: a request's samples are identical bit for bit (attention splits
    depend only on a sequence's own length, GEMM rows are independent, the noise is keyed by the request).
    Alone vs in a larger batch, the GEMM shapes and the split counts differ, so bf16 roundings differ and a
    sample diverges after a near tie: most, not all, agree (a noise keyed by batch position would give ~0)."""
    model = medium_model("qwen2").to(torch.bfloat16)
    decoder = Decoder.from_pretrained(model, num_kv_blocks=1024, block_size=16)
    params = SamplingParams(n=8, temperature=0.8, top_p=0.95, max_tokens=48, seed=5, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = medium_prompts()
    companions = [torch.randint(4, 4096, (len(p),), generator=g).tolist() for p in (prompts[0], prompts[2])]
    other = decoder.generate([prompts[1], *companions], params, use_tqdm=False)[0]
    alone = decoder.generate([prompts[1]], params, use_tqdm=False)[0]
    batched = decoder.generate([prompts[1], prompts[0], prompts[2]], params, use_tqdm=False)[0]
    assert [s.token_ids for s in other.outputs] == [s.token_ids for s in batched.outputs]
    same = sum(a.token_ids == b.token_ids for a, b in zip(alone.outputs, batched.outputs))
    assert same >= 4, f"only {same}/8 samples agree"
    assert decoder.stats.prefill_tokens == sum(len(p) for p in prompts)

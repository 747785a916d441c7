"""Decoder API: string prompts, stop strings, progress bar, per-request SamplingParams, counters."""

from grm_engine import Decoder, SamplingParams

from test_decode_models import hf_greedy, tiny_model


class CharTokenizer:
    """One lowercase letter per token id (id % 26): enough to test text and stop strings without downloads."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - ord("a") + 26 * 4 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_string_prompts_and_stop_strings(capsys):
    model = tiny_model("llama", seed=4)
    decoder = Decoder.from_pretrained(model, tokenizer=CharTokenizer(), num_kv_blocks=64, block_size=4)
    free = decoder.generate(["hello", "world"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=True)
    assert free[0].prompt_token_ids == CharTokenizer()("hello")["input_ids"]
    text = free[0].outputs[0].text
    assert text == CharTokenizer().decode(free[0].outputs[0].token_ids)
    stop = text[6:9]
    cut = text.find(stop)
    stopped = decoder.generate(["hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:cut]  # the stop string is not part of the text
    assert stopped.token_ids == free[0].outputs[0].token_ids[: cut + len(stop)]  # tokens up to the one completing it


def test_per_request_params_and_counters():
    model = tiny_model("qwen3")
    decoder = Decoder.from_pretrained(model, num_kv_blocks=128, block_size=4)
    template = list(range(100, 133))  # a shared instruction template of 33 tokens (8 full blocks)
    prompts = [template + [5, 6], template + [7, 8, 9], template + [10]]
    params = [SamplingParams(n=3, temperature=0.5, max_tokens=5, seed=1, ignore_eos=True),
              SamplingParams(n=1, temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, top_k=5, max_tokens=3, seed=2, ignore_eos=True, logprobs=True)]
    outputs = decoder.generate(prompts, params, use_tqdm=False)
    assert [len(r.outputs) for r in outputs] == [3, 1, 2]
    assert [len(s.token_ids) for r in outputs for s in r.outputs] == [5, 5, 5, 7, 3, 3]
    assert outputs[2].outputs[0].logprobs is not None and outputs[0].outputs[0].logprobs is None
    stats = decoder.stats
    # The template's 8 full blocks are computed once and hit twice, in the same prefill step.
    assert stats.prefix_cache_hit_tokens == 2 * 32
    assert stats.prefill_tokens == sum(len(p) for p in prompts) - 2 * 32
    assert stats.generated_tokens == 5 * 3 + 7 + 3 * 2 and stats.preemptions == 0 and stats.decode_steps == 6
    assert stats.peak_blocks_in_use > 0 and decoder.block_manager.num_blocks_in_use == 0


def test_prefix_cache_survives_between_calls_for_a_checkpoint_dir(tmp_path):
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path)
    decoder = Decoder.from_pretrained(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4)
    prompt = list(range(50, 70))
    first = decoder.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    second = decoder.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert decoder.stats.prefix_cache_hit_tokens == 16 and decoder.stats.prefill_tokens == 4
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids == hf_greedy(model, prompt, 4)


def test_an_interrupted_run_frees_its_blocks():
    model = tiny_model("llama")
    decoder = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4)
    calls = []

    def interrupt(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt

    decoder.step_hook = interrupt
    try:
        decoder.generate([list(range(5, 30))], SamplingParams(n=3, max_tokens=10, seed=0), use_tqdm=False)
    except KeyboardInterrupt:
        pass
    assert decoder.block_manager.num_blocks_in_use == 0
    decoder.block_manager.check_invariants([])
    decoder.step_hook = None
    out = decoder.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4

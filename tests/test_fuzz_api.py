"""Fuzzing the Python API with hypothesis (issue 16): SamplingParams fields, generate() prompts, grpo_loss arguments
and parse_scores. Each drawn input must give a clear error (TypeError / ValueError naming the argument) or the
correct result, checked against a plain predicate or reference written here; any other exception is a traceback
for the user and fails. Bounded: a few dozen examples each, derandomized (the same cases in every CI run)."""
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grm_engine.decode import Decoder, SamplingParams
from grm_engine.loss import grpo_loss, grpo_loss_reference
from grm_engine.parsing import ParseStatus, parse_scores_cpp, parse_scores_reference

from test_decode_models import tiny_model

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS = {"inputs": 0, "clear errors": 0, "correct results": 0}

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=4), st.just(np.int64(3)), st.just(np.float32(0.5)), st.lists(st.integers(0, 3), max_size=2))


def _field_ok(name, value) -> bool:
    """The plain rule for one SamplingParams field (None where the field allows it)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    is_num = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    finite = is_num and math.isfinite(float(value))
    return {"n": is_int and value >= 1,
            "temperature": finite and value >= 0,
            "top_p": finite and 0 < value <= 1,
            "top_k": is_int and value >= 0,
            "max_tokens": is_int and value >= 1,
            "seed": value is None or (is_int and 0 <= value < 2**63)}[name]


@FUZZ
@given(name=st.sampled_from(["n", "temperature", "top_p", "top_k", "max_tokens", "seed"]), value=ANY_VALUE)
def test_sampling_params_fields(name, value):
    COUNTS["inputs"] += 1
    try:
        params = SamplingParams(**{name: value})
    except (TypeError, ValueError) as e:
        assert name in str(e), e
        assert not _field_ok(name, value), f"{name}={value!r} is valid but was refused: {e}"
        COUNTS["clear errors"] += 1
        return
    assert _field_ok(name, value), f"{name}={value!r} was accepted (a silent default or truncation)"
    stored = getattr(params, name)
    assert stored == value and type(stored) in (int, float, type(None)), (name, value, stored)
    COUNTS["correct results"] += 1


DECODER_SETTINGS = ["block_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "max_model_len",
                    "num_scheduler_steps", "kv_cache_memory_fraction"]


def _setting_ok(name, value) -> bool:
    """The plain rule for one Decoder.from_pretrained engine setting (the others at their defaults)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    is_num = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return {"block_size": is_int and value >= 1 and value & (value - 1) == 0,
            "max_num_seqs": is_int and value >= 1, "max_num_batched_tokens": is_int and value >= 1,
            "num_kv_blocks": value is None or (is_int and value >= 1),
            "max_model_len": value is None or (is_int and value >= 1),
            "num_scheduler_steps": is_int and 1 <= value <= 64,
            "kv_cache_memory_fraction": is_num and 0 < value <= 1}[name]


class Loading(BaseException):
    """Raised instead of reading the model's weights: every setting passed its check."""


@FUZZ
@given(name=st.sampled_from(DECODER_SETTINGS), value=ANY_VALUE)
def test_decoder_settings_checked_before_loading(name, value):
    """A bad engine setting is a TypeError/ValueError naming it before the weights are read; a good one gets there."""
    import grm_engine.decode.loader as loader

    COUNTS["inputs"] += 1

    def loading(*args, **kwargs):
        raise Loading
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "weights_from_module", loading)
        try:
            Decoder.from_pretrained(tiny_model("llama"), **{name: value})
        except (TypeError, ValueError) as e:
            assert name in str(e), e
            assert not _setting_ok(name, value), f"{name}={value!r} is valid but was refused: {e}"
            COUNTS["clear errors"] += 1
            return
        except Loading:
            assert _setting_ok(name, value), f"{name}={value!r} reached the weights"
            COUNTS["correct results"] += 1
            return
    raise AssertionError("from_pretrained returned without reading the weights")


@pytest.fixture(scope="module")
def decoder():
    return Decoder.from_pretrained(tiny_model("llama"), num_kv_blocks=64, block_size=4, max_num_seqs=4)


TOKEN = st.one_of(st.integers(-2, 600), st.floats(-1, 600), st.booleans(), st.just(np.int32(7)), st.just(np.int64(9)),
                  st.text(max_size=2), st.none())
PROMPT = st.one_of(st.lists(TOKEN, max_size=4), st.lists(st.integers(4, 300), min_size=1, max_size=6),
                   st.integers(4, 9), st.text(max_size=3),
                   st.builds(lambda ids: np.array(ids, dtype=np.int64), st.lists(st.integers(4, 300), min_size=1, max_size=5)),
                   st.builds(lambda ids: np.array(ids, dtype=np.float32), st.lists(st.integers(4, 300), min_size=1, max_size=5)))
GREEDY = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def _plain(prompt, vocab_size: int):
    """The prompt as a list of Python ints when it is a valid token id list, else None (the rule, written plainly)."""
    if isinstance(prompt, np.ndarray):
        prompt = [int(t) for t in prompt] if np.issubdtype(prompt.dtype, np.integer) else None
    if not isinstance(prompt, list) or not prompt:
        return None  # (a string is text for a tokenizer; this decoder has none)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        return None
    ids = [int(t) for t in prompt]
    return ids if all(0 <= t < vocab_size for t in ids) else None


@FUZZ
@given(prompts=st.lists(PROMPT, min_size=1, max_size=3))
def test_generate_prompts(decoder, prompts):
    """Token-id prompts of any kind: a clear error naming the prompt, or the same tokens as the plain-int prompts."""
    COUNTS["inputs"] += 1
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
        plain = [_plain(prompts, decoder.vocab_size)]  # a flat list of ids is one prompt
    else:
        plain = [_plain(p, decoder.vocab_size) for p in prompts]
    try:
        outputs = decoder.generate(prompts, GREEDY, use_tqdm=False)
    except (TypeError, ValueError) as e:
        assert "prompt" in str(e), e
        assert any(p is None for p in plain) or any(isinstance(p, str) for p in prompts), (prompts, e)
        COUNTS["clear errors"] += 1
        return
    assert all(p is not None for p in plain), f"accepted {prompts!r}"
    expected = decoder.generate(plain, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert decoder.block_manager.num_blocks_in_use == 0
    COUNTS["correct results"] += 1


# ---- grpo_loss: one fault at a time on a small fresh problem ----
FAULTS = ["none", "nan_advantage", "inf_old_logp", "nan_ref_logp", "nan_beta", "float_ids", "id_out_of_range",
          "mask_shape", "zero_temperature", "nan_logit_masked", "inf_logit_masked", "both_advantages_and_rewards",
          "advantages_wrong_length", "bad_loss_type"]
ERROR_NAMES = {"nan_advantage": "advantages", "inf_old_logp": "old_logp", "nan_ref_logp": "ref_logp", "nan_beta": "beta",
               "float_ids": "completion_ids", "id_out_of_range": "completion_ids", "mask_shape": "mask",
               "zero_temperature": "temperature", "both_advantages_and_rewards": "advantages",
               "advantages_wrong_length": "advantages", "bad_loss_type": "loss_type"}


@FUZZ
@given(fault=st.sampled_from(FAULTS), batch=st.integers(1, 3), length=st.integers(1, 5), vocab=st.integers(2, 9),
       seed=st.integers(0, 2**16))
def test_grpo_loss_arguments(fault, batch, length, vocab, seed):
    COUNTS["inputs"] += 1
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[:, 0] = True
    kwargs = dict(advantages=torch.randn(batch, generator=g), old_logp=-torch.rand(batch, length, generator=g),
                  ref_logp=-torch.rand(batch, length, generator=g), beta=0.1)
    masked_position = (~mask).nonzero()
    if fault == "nan_advantage":
        kwargs["advantages"][0] = float("nan")
    elif fault == "inf_old_logp":
        kwargs["old_logp"][0, 0] = float("inf")
    elif fault == "nan_ref_logp":
        kwargs["ref_logp"][0, 0] = float("nan")
    elif fault == "nan_beta":
        kwargs["beta"] = float("nan")
    elif fault == "float_ids":
        ids = ids.float() + 0.7
    elif fault == "id_out_of_range":
        ids[0, 0] = vocab
    elif fault == "mask_shape":
        mask = mask[:, :-1] if length > 1 else mask[:0]
    elif fault == "zero_temperature":
        kwargs["temperature"] = 0.0
    elif fault in ("nan_logit_masked", "inf_logit_masked") and len(masked_position):
        b, t = masked_position[0].tolist()
        logits[b, t, 0] = float("nan") if fault == "nan_logit_masked" else float("inf")
    elif fault == "both_advantages_and_rewards":
        kwargs.update(rewards=torch.ones(batch), group_size=batch)
    elif fault == "advantages_wrong_length":
        kwargs["advantages"] = torch.randn(batch + 1)
    elif fault == "bad_loss_type":
        kwargs["loss_type"] = "mean"
    logits.requires_grad_(True)
    try:
        loss, _ = grpo_loss(logits, ids, mask, **kwargs)
    except (TypeError, ValueError) as e:
        assert fault in ERROR_NAMES and ERROR_NAMES[fault] in str(e), (fault, e)
        COUNTS["clear errors"] += 1
        return
    assert fault not in ERROR_NAMES, f"{fault} was accepted"
    loss.backward()
    # the peer: the reference with masked logits replaced by zeros (masked positions must never be read)
    clean = torch.where(mask[..., None], logits.detach(), torch.zeros(())).requires_grad_(True)
    want, _ = grpo_loss_reference(clean, ids, mask, **kwargs)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad * mask[..., None], clean.grad * mask[..., None], rtol=1e-5, atol=1e-6)
    assert not logits.grad[~mask].any()
    COUNTS["correct results"] += 1


# ---- parse_scores: the Python reference equals the C++ parser; bad counts are errors; linear time ----
FRAGMENTS = ["\\boxed{", "}", "[[", "]]", "]", "[", "1", "7", "10", "2.5", ".5", "8.", "1e1", "-3", "+2", ",", " ",
             "\n", "x", "inf", "nan", "\\boxed", "{", "１"]


@FUZZ
@given(texts=st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join), min_size=1, max_size=6),
       counts=st.integers(1, 3))
def test_parser_reference_equals_cpp(texts, counts):
    COUNTS["inputs"] += 1
    ref, cpp = parse_scores_reference(texts, counts), parse_scores_cpp(texts, counts)
    assert torch.equal(ref.status, cpp.status), texts
    torch.testing.assert_close(ref.scores, cpp.scores, equal_nan=True, rtol=0, atol=0)
    COUNTS["correct results"] += 1


@FUZZ
@given(num_responses=st.one_of(st.floats(allow_nan=True), st.booleans(), st.integers(-2, 0), st.just([1.5]),
                               st.just(np.array([2.0])), st.just([True]), st.text(max_size=2)))
def test_parser_bad_counts_are_errors(num_responses):
    COUNTS["inputs"] += 1
    for parse in (parse_scores_reference, parse_scores_cpp):
        with pytest.raises((TypeError, ValueError), match="num_responses|could not convert|invalid literal"):
            parse(["\\boxed{1}"], num_responses)
    COUNTS["clear errors"] += 1


def test_parser_reference_is_linear():
    """1 MB adversarial critiques (opener runs without closers, the pattern that cost 18 s at 64 KB when the fallback
    was quadratic: 1 MB would take over an hour) parse in well under the bound, the same as C++."""
    texts = ["[[" * 2**19, "\\boxed{" * 150_000, "[[1]]" * 200_000 + "[[", "[" * 2**20 + "]]", "\\boxed{1}" * 100_000]
    start = time.perf_counter()
    ref = parse_scores_reference(texts, 1)
    assert time.perf_counter() - start < 10
    cpp = parse_scores_cpp(texts, 1)
    assert torch.equal(ref.status, cpp.status)
    torch.testing.assert_close(ref.scores, cpp.scores, equal_nan=True, rtol=0, atol=0)
    assert ref.status.tolist() == [ParseStatus.NO_SCORES, ParseStatus.NO_SCORES, ParseStatus.OK, ParseStatus.NO_SCORES,
                                   ParseStatus.OK]


def test_report_counts():
    print("api fuzz:", COUNTS)

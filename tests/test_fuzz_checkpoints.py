"""Bad checkpoint folders (issue 16): every kind is a clear error naming the folder or file, before any model
loads in the CLI (exit 2, `error:`) and at Decoder.from_pretrained (ValueError / OSError), never a traceback,
and nothing in the folder changes. Deterministic kinds (truncated, garbage or empty safetensors, wrong shapes,
config.json that is a list, zero heads, broken tokenizers, ...) plus hypothesis-drawn config.json edits, which
must give either a clear error or a run that scores every example."""
import json
import os
import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from grm_engine.decode import Decoder
from grm_engine.demo import make_examples, write_jsonl
from grm_engine.grm import GRM

from reliability_helpers import cli_outcome, fingerprint, tiny_checkpoint

FAST = ["--k", "1", "--max-tokens", "2", "--max-num-seqs", "4", "--device", "cpu"]
COUNTS = {"inputs": 0, "clear errors": 0, "accepted": 0}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz_checkpoints"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("fuzz_checkpoint_data") / "data.jsonl", make_examples(2))


def _weights_file(folder):
    return os.path.join(folder, "model.safetensors")


def _edit_weights(folder, edit):
    weights = load_file(_weights_file(folder))
    edit(weights)
    save_file(weights, _weights_file(folder), metadata={"format": "pt"})


def _edit_json(name):
    def wrap(change):
        def mutate(folder):
            path = os.path.join(folder, name)
            with open(path) as f:
                value = json.load(f)
            value = change(value)
            with open(path, "w") as f:
                f.write(value if isinstance(value, str) else json.dumps(value))
        return mutate
    return wrap


def _truncate(folder):
    size = os.path.getsize(_weights_file(folder))
    with open(_weights_file(folder), "r+b") as f:
        f.truncate(size // 2)


def _garbage(folder):
    with open(_weights_file(folder), "wb") as f:
        f.write(random.Random(0).randbytes(4096))


def _header_claims_too_much(folder):  # a header length past the end of the file
    with open(_weights_file(folder), "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))


def _shard_index(weight_map):
    def mutate(folder):
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            f.write(weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map}))
    return mutate


def _replace_with_folder(name):
    def mutate(folder):
        os.remove(os.path.join(folder, name))
        os.makedirs(os.path.join(folder, name))
    return mutate


config = _edit_json("config.json")
KINDS = {
    "truncated safetensors": _truncate,
    "garbage safetensors": _garbage,
    "empty safetensors": lambda f: open(_weights_file(f), "wb").close(),
    "safetensors header past the end": _header_claims_too_much,
    "safetensors is a folder": _replace_with_folder("model.safetensors"),
    "wrong-shaped weight": lambda f: _edit_weights(f, lambda w: w.update(
        {"model.norm.weight": torch.ones(3)})),
    "missing weight": lambda f: _edit_weights(f, lambda w: w.pop("model.layers.1.self_attn.o_proj.weight")),
    "integer weight": lambda f: _edit_weights(f, lambda w: w.update(
        {"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
    "config.json a list": config(lambda c: [c]),
    "config.json not JSON": config(lambda c: "{not json"),
    "config.json not UTF-8": lambda f: open(os.path.join(f, "config.json"), "wb").write(b'{"model_type": "\xff"}'),
    "config.json a folder": _replace_with_folder("config.json"),
    "zero attention heads": config(lambda c: {**c, "num_attention_heads": 0}),
    "negative layers": config(lambda c: {**c, "num_hidden_layers": -1}),
    "hidden size a string": config(lambda c: {**c, "hidden_size": "64"}),
    "vocab size zero": config(lambda c: {**c, "vocab_size": 0}),
    "context zero": config(lambda c: {**c, "max_position_embeddings": 0}),
    "heads not dividing hidden": config(lambda c: {**c, "num_attention_heads": 3, "num_key_value_heads": 3}),
    "no model_type": config(lambda c: {k: v for k, v in c.items() if k != "model_type"}),
    "tokenizer.json garbage": lambda f: open(os.path.join(f, "tokenizer.json"), "w").write("{garbage"),
    "tokenizer_config.json a list": _edit_json("tokenizer_config.json")(lambda c: [c]),
    "tokenizer.json empty object": lambda f: open(os.path.join(f, "tokenizer.json"), "w").write("{}"),
    "shard index not JSON": _shard_index("{nope"),
    "shard index names a missing shard": _shard_index({"model.norm.weight": "model-00002.safetensors"}),
    "shard index points outside": _shard_index({"model.norm.weight": "../model.safetensors"}),
}


def bad_copy(good, tmp_path, kind):
    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    KINDS[kind](folder)
    return folder


def _refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_checkpoint_folder_is_a_clear_error_before_loading(good, data, tmp_path, capsys, monkeypatch, kind):
    folder = bad_copy(good, tmp_path, kind)
    before = fingerprint(tmp_path)
    monkeypatch.setattr(GRM, "from_pretrained", _refuse_loading)
    out = tmp_path / "out.jsonl"
    code, err = cli_outcome(["score", "--model", folder, "--data", data, "--out", str(out), *FAST], capsys)
    COUNTS["inputs"] += 1
    assert code == 2, (kind, code, err)
    assert "error:" in err and folder in err, err
    COUNTS["clear errors"] += 1
    assert fingerprint(tmp_path) == before  # no results file, no sidecar, the folder untouched


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_checkpoint_folder_is_a_clear_error_in_the_decoder_api(good, tmp_path, kind):
    folder = bad_copy(good, tmp_path, kind)
    before = fingerprint(tmp_path)
    with pytest.raises((ValueError, OSError, NotImplementedError)) as raised:
        Decoder.from_pretrained(folder, device="cpu", dtype=torch.float32, num_kv_blocks=8, block_size=4)
    assert folder in str(raised.value), raised.value
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_checkpoint_folder_is_a_clear_error_in_training(good, tmp_path, capsys, kind):
    """`train sft` checks the folder (config, headers, weights, context, tokenizer) before transformers loads it:
    transformers would random-init a missing weight, read a shard outside the folder, or raise from its internals."""
    from train_helpers import write_sft_data

    folder = bad_copy(good, tmp_path, kind)
    data = write_sft_data(tmp_path / "sft.jsonl", count=4)
    before = fingerprint(folder)
    code, err = cli_outcome(["train", "sft", "--model", folder, "--data", data, "--output_dir",
                             str(tmp_path / "run"), "--max_steps", "1", "--device", "cpu"], capsys)
    COUNTS["inputs"] += 1
    assert code == 2, (kind, code, err)
    assert "error:" in err and folder in err, err
    assert not (tmp_path / "run" / "checkpoint-1").exists() and fingerprint(folder) == before
    COUNTS["clear errors"] += 1


@pytest.fixture(scope="module")
def good_meta_rm(good, tmp_path_factory):
    """A tiny one-label LlamaForSequenceClassification over the same tokenizer (a meta RM folder)."""
    import transformers as tf

    from grm_engine.demo import tiny_config

    path = str(tmp_path_factory.mktemp("fuzz_meta_rm") / "meta")
    tokenizer = tf.AutoTokenizer.from_pretrained(good)
    torch.manual_seed(2)
    tf.LlamaForSequenceClassification(tiny_config("llama", tokenizer, num_labels=1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_meta_rm_folder_is_a_clear_error_before_loading(good, good_meta_rm, data, tmp_path, capsys, monkeypatch,
                                                            kind):
    folder = bad_copy(good_meta_rm, tmp_path, kind)
    before = fingerprint(tmp_path)
    monkeypatch.setattr(GRM, "from_pretrained", _refuse_loading)
    out = tmp_path / "out.jsonl"
    code, err = cli_outcome(["score", "--model", good, "--meta-rm", folder, "--data", data, "--out", str(out),
                             *FAST], capsys)
    COUNTS["inputs"] += 1
    assert code == 2 and "error:" in err and folder in err, (kind, code, err)
    assert fingerprint(tmp_path) == before
    COUNTS["clear errors"] += 1


def test_a_good_meta_rm_folder_passes(good_meta_rm):
    from grm_engine.meta_rm import check_meta_rm_dir

    assert check_meta_rm_dir(good_meta_rm) == "classifier"


# hypothesis: one config.json key set to a drawn value -> a clear error, or a run that scores every example
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
               "model_type", "eos_token_id", "torch_dtype", "attention_bias", "rope_scaling", "hidden_act"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([64, 96, 2**31, 2**64, 16, 8]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.lists(st.integers(-1, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(CONFIG_KEYS), value=VALUES)
def test_fuzzed_config_is_a_clear_error_or_a_complete_run(good, data, tmp_path_factory, capsys, key, value):
    tmp_path = tmp_path_factory.mktemp("fuzz_config")
    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config_dict = json.load(f)
    config_dict[key] = value
    with open(config_path, "w") as f:
        json.dump(config_dict, f)
    before = fingerprint(folder)
    out = tmp_path / "out.jsonl"
    code, err = cli_outcome(["score", "--model", folder, "--data", data, "--out", str(out), *FAST], capsys)
    COUNTS["inputs"] += 1
    assert code in (0, 2), (key, value, code, err)
    if code == 2:
        assert "error:" in err and folder in err, (key, value, err)
        assert not out.exists()
        COUNTS["clear errors"] += 1
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["ex0", "ex1"], (key, value)
        COUNTS["accepted"] += 1
    assert fingerprint(folder) == before


def test_report_counts():
    """Printed with -s: how many inputs the checkpoint fuzz tried and how they ended."""
    print("checkpoint fuzz:", COUNTS)

"""Checkpoints the decoder must refuse with an error naming the weight and the folder (issue 16, fault 4), and
code in a checkpoint folder that never runs unless trust_remote_code is given (issue 16, remote code).

Real folders: tiny random-init transformers models saved with save_pretrained, then edited on disk."""
import builtins
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from grm_engine import cli
from grm_engine.decode import Decoder
from grm_engine.demo import build_tokenizer, make_examples, tiny_config, write_jsonl
from grm_engine.grm import GRM, check_checkpoint_dir
from grm_engine.meta_rm import MetaRM

from test_decode_models import tiny_model


def save_llama(path, tokenizer_dir=None):
    """A tiny untied Llama (tie_word_embeddings false) in one model.safetensors; with a tokenizer folder: over that
    tokenizer's vocabulary, the tokenizer saved beside it."""
    if tokenizer_dir is None:
        model = tiny_model("llama", seed=1)
    else:
        import transformers as tf

        torch.manual_seed(1)
        tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
        model = tf.LlamaForCausalLM(tiny_config("llama", tokenizer))
        tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return model


def edit_weights(path, edit):
    weights = load_file(os.path.join(path, "model.safetensors"))
    edit(weights)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def decoder_from(path):
    return Decoder.from_pretrained(str(path), device="cpu", dtype=torch.float32, num_kv_blocks=16, block_size=4)


def test_missing_lm_head_is_an_error_not_the_embeddings(tmp_path):
    save_llama(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    edit_weights(tmp_path, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=f"{tmp_path}.*lacks weight 'lm_head.weight'.*tie_word_embeddings false"):
        decoder_from(tmp_path)


def test_missing_and_wrong_shaped_weights_are_named(tmp_path):
    save_llama(tmp_path)
    edit_weights(tmp_path, lambda w: w.update({"model.layers.1.mlp.down_proj.weight":
                                               w["model.layers.1.mlp.down_proj.weight"].t().contiguous()}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' has shape \[96, 64\], config.json "
                                         r"implies \[64, 96\]"):
        decoder_from(tmp_path)
    edit_weights(tmp_path, lambda w: w.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=f"{tmp_path}.*lacks weight 'model.layers.0.self_attn.k_proj.weight'"):
        decoder_from(tmp_path)


def test_bad_config_sizes_are_named(tmp_path):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        decoder_from(tmp_path)
    model = tiny_model("llama")
    model.config.num_attention_heads = 0
    with pytest.raises(ValueError, match="live module.*num_attention_heads=0"):
        Decoder.from_pretrained(model, num_kv_blocks=16)


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_shard_index_pointing_outside_the_folder_is_an_error(tmp_path, where):
    folder = tmp_path / "ckpt"
    tiny_model("qwen3", seed=3).save_pretrained(folder, max_shard_size="40KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    target = {"parent": "../" + shard, "absolute": str(tmp_path / shard), "subfolder": "sub/" + shard}[where]
    os.makedirs(os.path.dirname(os.path.join(folder, target)), exist_ok=True)
    shutil.copy(folder / shard, os.path.join(folder, target))
    index["weight_map"][name] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"weight '{name}' points to .*outside the checkpoint folder"):
        decoder_from(folder)


def test_score_refuses_a_checkpoint_without_lm_head_before_loading(tmp_path, capsys, monkeypatch):
    build_tokenizer(tmp_path / "tokenizer")
    save_llama(tmp_path / "model", tmp_path / "tokenizer")
    check_checkpoint_dir(str(tmp_path / "model"))  # complete: accepted
    edit_weights(tmp_path / "model", lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        check_checkpoint_dir(str(tmp_path / "model"))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(GRM, "from_pretrained", no_loading)
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(2))
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", "--model", str(tmp_path / "model"), "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and str(tmp_path / "model") in err and not out.exists()


# ---- code in a checkpoint folder ----
REMOTE_CONFIG = '''
import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def remote_code_folder(path, tokenizer_dir):
    """A meta-RM-looking folder whose config needs code from the folder (configuration_evil.py)."""
    os.makedirs(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    (path / "configuration_evil.py").write_text(REMOTE_CONFIG)
    (path / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForSequenceClassification"], "num_labels": 1,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    return path


def test_remote_code_never_runs_and_never_prompts(tmp_path, monkeypatch):
    build_tokenizer(tmp_path / "tokenizer")
    folder = remote_code_folder(tmp_path / "evil", tmp_path / "tokenizer")
    prompts = []

    def answer_yes(prompt=""):  # a user who answers y to transformers' "run the custom code?" prompt
        prompts.append(prompt)
        return "y"
    monkeypatch.setattr(builtins, "input", answer_yes)
    with pytest.raises((ValueError, OSError)):
        MetaRM.from_pretrained(str(folder))
    with pytest.raises((ValueError, OSError)):
        Decoder.from_pretrained(str(folder), device="cpu", num_kv_blocks=8)
    assert prompts == [] and not (folder / "REMOTE_CODE_RAN").exists()


def test_trust_remote_code_flag_reaches_every_loader(tmp_path, monkeypatch):
    """--trust-remote-code (and only it) turns remote code on: every transformers loader gets the flag explicitly."""
    import transformers

    build_tokenizer(tmp_path / "tokenizer")
    save_llama(tmp_path / "model", tmp_path / "tokenizer")
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(1))
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _original(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    common = ["--model", str(tmp_path / "model"), "--data", data, "--k", "1", "--max-tokens", "2", "--device", "cpu"]
    assert cli.main(["score", *common, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert seen and {flag for _, flag in seen} == {False}, seen
    seen.clear()
    assert cli.main(["score", *common, "--out", str(tmp_path / "b.jsonl"), "--trust-remote-code"]) == 0
    assert seen and {flag for _, flag in seen} == {True}, seen

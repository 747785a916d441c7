"""Fuzzing data files and command-line flags with hypothesis (issue 16).

Data files: valid rows mixed with corrupted lines (numbers beyond 1e308, non-UTF-8 bytes, deep nesting, a 5,000-digit
id, lone surrogates, empty responses, random bytes, JSON that is not a row). Loading must raise a DataError naming
the file and the first bad line, and with skip_invalid keep exactly the valid rows and count every bad line.
Flags: drawn values for the numeric options and --device. `score` must end with exit status 2 and an `error:` line
before any model loads, or reach the model load only with values the options' rule allows; nothing in the folder
changes on an error. Derandomized and bounded (a few dozen examples each)."""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grm_engine.data import DataError, load_examples
from grm_engine.demo import make_examples, write_jsonl
from grm_engine.grm import GRM

from reliability_helpers import cli_outcome, fingerprint, tiny_checkpoint

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS = {"inputs": 0, "clear errors": 0, "correct results": 0}

CORRUPT = {
    "number over 1e308": b'{"id": "c", "query": "q", "responses": ["a", "b"], "scores": [1' + b"0" * 400 + b', 2]}',
    "float over 1e308": b'{"id": "c", "query": "q", "responses": ["a", "b"], "scores": [1e999, 2]}',
    "non-UTF-8": b'{"id": "c", "query": "q\xff\xfe", "responses": ["a", "b"], "best": 0}',
    "nested brackets": b"[" * 100_000 + b"]" * 100_000,
    "nested in a field": b'{"id": "c", "query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5,000-digit id": b'{"id": ' + b"7" * 5000 + b', "query": "q", "responses": ["a", "b"], "best": 0}',
    "lone surrogate": b'{"id": "c", "query": "q", "responses": ["a\\udc00", "b"], "best": 0}',
    "empty response": b'{"id": "c", "query": "q", "responses": ["a", ""], "best": 0}',
    "not an object": b"[1, 2]",
    "truncated": b'{"id": "c", "query": "q", "respon',
    "best a float": b'{"id": "c", "query": "q", "responses": ["a", "b"], "best": 1.0}',
    "NaN score": b'{"id": "c", "query": "q", "responses": ["a", "b"], "scores": [NaN, 1]}',
}


def _valid_row(i: int, rng_text: str) -> dict:
    return {"id": f"r{i}", "query": "q " + rng_text, "responses": ["a " + rng_text, "b"], "best": i % 2}


LINE = st.one_of(st.tuples(st.just("valid"), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)),
                 st.tuples(st.sampled_from(sorted(CORRUPT)), st.just("")),
                 st.tuples(st.just("random bytes"), st.binary(min_size=1, max_size=12).filter(
                     lambda b: b"\n" not in b and b.strip() and not b.startswith(b"\xef\xbb\xbf"))))


@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=8), bom=st.booleans())
def test_fuzzed_data_file(tmp_path_factory, lines, bom):
    COUNTS["inputs"] += 1
    path = tmp_path_factory.mktemp("fuzz_data") / "data.jsonl"
    body, valid_ids, bad_lines = [], [], []
    for number, (kind, text) in enumerate(lines, start=1):
        if kind == "valid":
            row = _valid_row(number, text)
            body.append(json.dumps(row, ensure_ascii=False).encode())
            valid_ids.append(row["id"])
        else:
            body.append(CORRUPT[kind] if kind in CORRUPT else text)
            bad_lines.append(number)
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(body) + b"\n"
    path.write_bytes(data)
    if not valid_ids:
        with pytest.raises(DataError, match="no usable examples"):
            load_examples(path, skip_invalid=True)
    else:
        kept = load_examples(path, skip_invalid=True)
        assert [e.id for e in kept] == valid_ids and kept.skipped == len(bad_lines)
        for example, (kind, text) in zip(kept, [line for line in lines if line[0] == "valid"]):
            assert example.query == "q " + text and example.responses == ["a " + text, "b"]
    if bad_lines:
        with pytest.raises(DataError) as raised:
            load_examples(path)
        assert str(raised.value).startswith(f"{path}, line {bad_lines[0]}"), (raised.value, bad_lines)
        COUNTS["clear errors"] += 1
    else:
        assert [e.id for e in load_examples(path)] == valid_ids
        COUNTS["correct results"] += 1
    assert path.read_bytes() == data


def test_data_folder_reads_every_json_file_under_it_in_any_case(tmp_path):
    folder = tmp_path / "data"
    (folder / "set" / "goal").mkdir(parents=True)
    (folder / ".cache").mkdir()
    write_jsonl(folder / "a.JSONL", make_examples(2, seed=1))
    rows = make_examples(2, seed=2)
    for e in rows:
        e.id = "b-" + e.id
    write_jsonl(folder / "set" / "goal" / "b.json", rows)  # nested, as RMB's set/goal/category folders
    write_jsonl(folder / ".cache" / "old.jsonl", make_examples(3, seed=3))  # hidden: never read
    (folder / ".hidden.jsonl").write_text("not json\n")
    (folder / "notes.txt").write_text("not data\n")
    ids = [e.id for e in load_examples(folder)]
    assert ids == ["ex0", "ex1", "b-ex0", "b-ex1"]


# ---- flags ----
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz_cli_model"))


class Loaded(BaseException):
    """Raised instead of loading the model: the run got past every check."""


def run_until_load(argv, capsys):
    """The CLI with GRM.from_pretrained replaced by a stop -> (the load's keyword arguments, None, None) when the run
    got past every check, else (None, exit status, stderr)."""
    def loaded(*args, **kwargs):
        raise Loaded(kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GRM, "from_pretrained", loaded)
        try:
            code, err = cli_outcome(argv, capsys, passthrough=Loaded)
        except Loaded as reached:
            return reached.args[0], None, None
    return None, code, err


NUMBERS = st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-1", "0", "0.0", "1", "0.5", "1.5", "2", "3", "300",
                           "abc", "", "1e-300", "4", "8", "0x10", "1_0"])
FLAGS = {"--temperature": NUMBERS, "--kv-cache-memory-fraction": NUMBERS, "--max-num-seqs": NUMBERS, "--k": NUMBERS,
         "--max-tokens": NUMBERS, "--chunk-size": NUMBERS, "--seed": NUMBERS,
         "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "meta", "mps", "gpu", "", "cpu:0"])}


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        return None


def _allowed(options: dict) -> bool:
    """The rule for these options, written plainly (defaults where a flag is not given)."""
    def get(flag, kind, default):
        return _number(options[flag], kind) if flag in options else default
    temperature, fraction = get("--temperature", float, 0.5), get("--kv-cache-memory-fraction", float, 0.9)
    seqs, k = get("--max-num-seqs", int, "default"), get("--k", int, 8)
    max_tokens, chunk, seed = get("--max-tokens", int, 1024), get("--chunk-size", int, 256), get("--seed", int, 0)
    if None in (temperature, fraction, seqs, k, max_tokens, chunk, seed):
        return False
    device = options.get("--device", "cpu")
    return (math.isfinite(temperature) and temperature >= 0 and math.isfinite(fraction) and 0 < fraction <= 1
            and k >= 1 and max_tokens >= 1 and chunk >= 1 and (seqs == "default" or 1 <= k <= seqs)
            and (device in ("cpu", "cpu:0") or (device.startswith("cuda") and torch.cuda.is_available())))


@FUZZ
@given(options=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({key: FLAGS[key] for key in keys})))
def test_fuzzed_flags(model, tmp_path_factory, capsys, options):
    COUNTS["inputs"] += 1
    folder = tmp_path_factory.mktemp("fuzz_flags")
    data = write_jsonl(folder / "data.jsonl", make_examples(2))
    out = folder / "out.jsonl"
    before = fingerprint(folder)
    argv = ["score", "--model", model, "--data", data, "--out", str(out)]
    if "--device" not in options:
        argv += ["--device", "cpu"]
    for flag, value in options.items():
        argv += [f"{flag}={value}"]
    kwargs, code, err = run_until_load(argv, capsys)
    if kwargs is not None:
        assert _allowed(options), f"{options} reached the model load"
        assert kwargs["max_num_seqs"] >= int(options.get("--k", 8)) >= 1
        COUNTS["correct results"] += 1
        return
    assert code == 2, (options, code, err)
    assert "error:" in err, err
    assert not _allowed(options), f"{options} is valid but was refused: {err}"
    assert fingerprint(folder) == before
    COUNTS["clear errors"] += 1




@FUZZ
@given(parts=st.lists(st.sampled_from(["1", "2", "8", "0", "-1", "a", "", " 4", "300", "1.5"]), min_size=1, max_size=4),
       seqs=st.sampled_from([None, "8", "300"]))
def test_fuzzed_eval_k(model, tmp_path_factory, capsys, parts, seqs):
    """eval --k "1,8,32": a clear error before loading, or the load with every k decodable at once."""
    COUNTS["inputs"] += 1
    folder = tmp_path_factory.mktemp("fuzz_eval_k")
    data = write_jsonl(folder / "data.jsonl", make_examples(2))
    k_text = ",".join(parts)
    argv = ["eval", "--model", model, "--data", data, "--out-dir", str(folder / "eval"), "--device", "cpu",
            f"--k={k_text}", *(["--max-num-seqs", seqs] if seqs else [])]
    ks = [_number(p.strip(), int) for p in parts if p.strip()]
    allowed = bool(ks) and None not in ks and min(ks) >= 1 and (seqs is None or max(ks) <= int(seqs))
    kwargs, code, err = run_until_load(argv, capsys)
    if kwargs is not None:
        assert allowed, f"--k {k_text!r} --max-num-seqs {seqs} reached the model load"
        assert kwargs["max_num_seqs"] >= max(ks)
        COUNTS["correct results"] += 1
        return
    assert code == 2 and "error:" in err, (k_text, code, err)
    assert not allowed, f"--k {k_text!r} --max-num-seqs {seqs} is valid but was refused: {err}"
    assert not (folder / "eval" / "results.json").exists()
    COUNTS["clear errors"] += 1


# ---- the training entry points' config: the same kinds of values ----
TRAIN_KEYS = {"learning_rate": float, "warmup_ratio": float, "weight_decay": float, "adam_beta1": float,
              "adam_beta2": float, "max_grad_norm": float, "per_device_train_batch_size": int,
              "gradient_accumulation_steps": int, "max_steps": int, "logging_steps": int, "save_steps": int,
              "max_seq_length": int, "temperature": float, "top_p": float, "beta": float, "epsilon": float,
              "num_generations": int, "kv_cache_memory_fraction": float, "device": str}


def _train_value_allowed(key: str, text: str) -> bool:
    """The rule for one GRPO config key given as a command-line string (the other keys valid), written plainly."""
    kind = TRAIN_KEYS[key]
    if kind is str:
        return text in ("", "cpu", "cpu:0") or (text.startswith("cuda") and torch.cuda.is_available())  # "": auto
    value = _number(text.strip(), kind)
    if value is None or not math.isfinite(value):
        return False
    rules = {"learning_rate": value > 0, "warmup_ratio": 0 <= value < 1, "weight_decay": value >= 0,
             "adam_beta1": 0 <= value < 1, "adam_beta2": 0 <= value < 1, "max_grad_norm": value >= 0,
             "max_steps": value >= 0, "save_steps": value >= 0, "temperature": value > 0, "top_p": 0 < value <= 1,
             "beta": value >= 0, "epsilon": value >= 0, "num_generations": value >= 2,
             "kv_cache_memory_fraction": 0 < value <= 1}
    return rules.get(key, value >= 1)


@FUZZ
@given(key=st.sampled_from(sorted(TRAIN_KEYS)), text=st.one_of(NUMBERS, FLAGS["--device"]))
def test_fuzzed_train_config(model, tmp_path_factory, key, text):
    from grm_engine.train.config import ConfigError, load_config

    COUNTS["inputs"] += 1
    folder = tmp_path_factory.mktemp("fuzz_train")
    data = write_jsonl(folder / "data.jsonl", make_examples(2))
    flags = ["--model", model, "--data", data, "--output_dir", str(folder / "out"), "--max_steps", "2",
             f"--{key}", text] if text != "" else ["--model", model, "--data", data, "--output_dir",
                                                    str(folder / "out"), "--max_steps", "2", f"--{key}="]
    try:
        config = load_config("grpo", None, flags)
    except ConfigError as e:
        assert key in str(e), e
        assert not _train_value_allowed(key, text), f"--{key} {text!r} is valid but was refused: {e}"
        COUNTS["clear errors"] += 1
        return
    assert _train_value_allowed(key, text), f"--{key} {text!r} was accepted as {getattr(config, key)!r}"
    expected = text if TRAIN_KEYS[key] is str else TRAIN_KEYS[key](text.strip())
    assert getattr(config, key) == expected
    assert not (folder / "out").exists()  # loading a config writes nothing
    COUNTS["correct results"] += 1


def load_grpo_config(model, data, folder, flags, key: str, allowed: bool, what: str):
    """`load_config("grpo")` with flags after --model / --data / --output_dir FOLDER/out: a ConfigError must name
    key and come exactly when the input is not allowed, and nothing in folder is written or changed. -> the config,
    or None after a clear error."""
    from grm_engine.train.config import ConfigError, load_config

    before = fingerprint(folder)
    try:
        config = load_config("grpo", None, ["--model", model, "--data", data, "--output_dir", str(folder / "out"),
                                            *flags])
    except ConfigError as e:
        assert key in str(e), e
        assert not allowed, f"{what} is valid but was refused: {e}"
        COUNTS["clear errors"] += 1
        config = None
    else:
        assert allowed, f"{what} was accepted"
        COUNTS["correct results"] += 1
    assert fingerprint(folder) == before  # nothing written, nothing changed
    return config


TEMPLATE_CHOICES = ["default", "single", "", "Default", "grm", "single:", "good", "single:good", "bad", "single:bad",
                    "empty", "missing", "single:missing", "folder"]


@FUZZ
@given(choice=st.sampled_from(TEMPLATE_CHOICES))
def test_fuzzed_train_template(model, tmp_path_factory, choice):
    """template (rft, grpo, meta-rm): 'default', 'single', a valid template file or single:FILE; anything else
    (a file with an unknown placeholder, an empty or missing file, a folder, another word) a ConfigError naming the
    key, and nothing written."""
    from grm_engine.templates import BUILTIN_DIR

    COUNTS["inputs"] += 1
    folder = tmp_path_factory.mktemp("fuzz_template")
    data = write_jsonl(folder / "data.jsonl", make_examples(2))
    with open(f"{BUILTIN_DIR}/default.txt", encoding="utf-8") as f:
        default_text = f.read()
    files = {"good": default_text, "bad": default_text.replace("{{responses}}", "{{responses}} {{nonsense}}", 1),
             "empty": ""}
    for name, text in files.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    (folder / "folder.txt").mkdir()
    paths = {name: str(folder / f"{name}.txt") for name in (*files, "missing", "folder")}
    prefix, _, rest = choice.rpartition(":") if choice.startswith("single:") else ("", "", choice)
    value = f"{prefix}:{paths[rest]}" if prefix and rest in paths else paths.get(choice, choice)
    allowed = choice in ("default", "single", "good", "single:good")
    config = load_grpo_config(model, data, folder, [f"--template={value}"], "template", allowed, f"template {choice!r}")
    assert config is None or config.template == value


def test_report_counts():
    print("data/flag fuzz:", COUNTS)


REFERENCES = ["copy", "sharded", "none", "", "Sharded", "shard", "copy,none"]


@FUZZ
@given(reference=st.sampled_from(REFERENCES), deepspeed=st.sampled_from(["", "zero2", "zero3"]),
       beta=st.sampled_from(["0", "0.08"]))
def test_fuzzed_train_reference(model, tmp_path_factory, reference, deepspeed, beta):
    """reference (grpo): copy, sharded (only with a ZeRO-3 config) or none (only with beta 0); anything else a
    ConfigError naming the key, before any model loads, and nothing written."""
    COUNTS["inputs"] += 1
    folder = tmp_path_factory.mktemp("fuzz_reference")
    data = write_jsonl(folder / "data.jsonl", make_examples(2))
    allowed = (reference in ("copy", "sharded", "none") and (reference != "sharded" or deepspeed == "zero3")
               and (reference != "none" or beta == "0"))
    config = load_grpo_config(model, data, folder,
                              [f"--reference={reference}", f"--deepspeed={deepspeed}", f"--beta={beta}"], "reference",
                              allowed, f"reference {reference!r} with deepspeed {deepspeed!r}, beta {beta}")
    assert config is None or config.reference == reference

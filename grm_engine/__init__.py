"""grm-engine: a lean, custom-kernel engine for generative reward models (DeepSeek-GRM style)."""
import os as _os

# Imported from a source checkout (e.g. `python -m grm_engine` run in the repository root, which puts the root
# first on sys.path ahead of the installed package): kernels/ and train/ sit next to this folder, as setup.py's
# package_dir maps them (grm_engine.kernels, grm_engine.train); let the subpackage search find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, *p)) for p in (("setup.py",), ("kernels", "__init__.py"),
                                                              ("train", "__init__.py"))):
    __path__.append(_root)  # noqa: F821 (the package's own __path__)
from ._backends import backends
from .loss import GRPOStats, fused_linear_grpo_loss, group_advantages, grpo_loss, token_logprobs
from .data import DataError, Example, ExampleSet, load_examples
from .decode import Decoder, RequestOutput, SamplingParams
from .metrics import accuracy, accuracy_by_subset, best_of_n_accuracy, example_credits, rewardbench_scores
from .parsing import ParsedScores, ParseStatus, parse_scores
from .protocol import build_meta_prompt, build_prompt
from .voting import VoteResult, is_correct, rule_reward, vote
from .vocab_bytes import VocabBytes
from .gpu_scoring import parse_scores_from_tokens
from .grm import GRM, ScoreResult
from .meta_rm import MetaRM

__version__ = "0.1.0"

__all__ = [
    "GRM",
    "ScoreResult",
    "MetaRM",
    "GRPOStats",
    "group_advantages",
    "grpo_loss",
    "fused_linear_grpo_loss",
    "token_logprobs",
    "backends",
    "ParsedScores",
    "ParseStatus",
    "parse_scores",
    "DataError",
    "Example",
    "ExampleSet",
    "load_examples",
    "accuracy",
    "accuracy_by_subset",
    "best_of_n_accuracy",
    "example_credits",
    "rewardbench_scores",
    "build_prompt",
    "build_meta_prompt",
    "VoteResult",
    "is_correct",
    "rule_reward",
    "vote",
    "VocabBytes",
    "parse_scores_from_tokens",
    "Decoder",
    "RequestOutput",
    "SamplingParams",
]

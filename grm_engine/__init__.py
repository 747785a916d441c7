"""grm-engine: a lean, custom-kernel engine for generative reward models (DeepSeek-GRM style)."""
from ._backends import backends
from .parsing import ParsedScores, ParseStatus, parse_scores
from .protocol import build_meta_prompt, build_prompt
from .voting import VoteResult, is_correct, rule_reward, vote

__version__ = "0.1.0"

__all__ = [
    "backends",
    "ParsedScores",
    "ParseStatus",
    "parse_scores",
    "build_prompt",
    "build_meta_prompt",
    "VoteResult",
    "is_correct",
    "rule_reward",
    "vote",
]

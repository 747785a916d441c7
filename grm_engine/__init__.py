"""grm-engine: a lean, custom-kernel engine for generative reward models (DeepSeek-GRM style)."""
from ._backends import backends
from .parsing import ParsedScores, ParseStatus, parse_scores

__version__ = "0.1.0"

__all__ = [
    "backends",
    "ParsedScores",
    "ParseStatus",
    "parse_scores",
]

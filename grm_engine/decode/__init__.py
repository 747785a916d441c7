"""Paged multi-sample decoder (see DESIGN.md "Decoder shape")."""
from .config import DecoderConfig, SamplingParams
from .decoder import Decoder
from .outputs import DecoderStats, RequestOutput, SampleOutput

__all__ = ["Decoder", "DecoderConfig", "DecoderStats", "RequestOutput", "SampleOutput", "SamplingParams"]

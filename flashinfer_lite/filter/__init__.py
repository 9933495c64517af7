"""Prompt token filters: an early layer picks the tokens the full model reads (GemFilter)."""

from ..options import DEFAULT_KEEP, DEFAULT_THRESHOLD, FilterOptions
from .gemfilter import (
                        FilterResult,
                        GemFilter,
                        default_filter_layer,
                        protected_mask,
                        select,
                        smooth,
)

__all__ = ["DEFAULT_KEEP", "DEFAULT_THRESHOLD", "FilterOptions", "FilterResult", "GemFilter",
           "default_filter_layer", "protected_mask", "select", "smooth"]

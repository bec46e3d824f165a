"""Model merging: a streaming engine over safetensors and a registry of merge methods.

Public API: `merge_models`, `merge_from_config`, `MERGE_METHODS`, `MergeMethod`, `get_method`.
"""

from pefteval_harness.merging.engine import merge_from_config, merge_models
from pefteval_harness.merging.methods import MERGE_METHODS, MergeMethod, get_method

__all__ = ["MERGE_METHODS", "MergeMethod", "get_method", "merge_from_config", "merge_models"]

"""Model merging: a streaming engine over safetensors, a registry of merge methods with typed parameters,
and the merge settings and adapter rules every entry point validates against.

Public API: `merge_models`, `merge_from_config`, `MERGE_METHODS`, `MergeMethod`, `MergeContext`,
`get_method`, `describe_methods`, `tensor_generator`, `MergeSettings`, `MergeRecipe`, `ExpertEntry`,
`load_recipe`, `check_adapters`, `ADAPTER_FAMILIES`, `SPACES`.
"""

from pefteval_harness.merging.config import (
    ADAPTER_FAMILIES,
    SPACES,
    ExpertEntry,
    MergeRecipe,
    MergeSettings,
    check_adapters,
    load_recipe,
)
from pefteval_harness.merging.engine import merge_from_config, merge_models
from pefteval_harness.merging.methods import (
    MERGE_METHODS,
    MergeContext,
    MergeMethod,
    describe_methods,
    get_method,
    tensor_generator,
)

__all__ = [
    "ADAPTER_FAMILIES",
    "MERGE_METHODS",
    "SPACES",
    "ExpertEntry",
    "MergeContext",
    "MergeMethod",
    "MergeRecipe",
    "MergeSettings",
    "check_adapters",
    "describe_methods",
    "get_method",
    "load_recipe",
    "merge_from_config",
    "merge_models",
    "tensor_generator",
]

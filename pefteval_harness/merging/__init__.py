"""Model merging: a streaming engine over safetensors, a registry of merge methods with typed parameters,
the merge settings and adapter rules every entry point validates against, mergekit-style recipes and model
cards, and the theory quantities a merge can record (`merging.theory`).

Public API: `merge_models`, `merge_from_config`, `MERGE_METHODS`, `MergeMethod`, `MergeContext`,
`get_method`, `describe_methods`, `tensor_generator`, `MergeSettings`, `MergeRecipe`, `ExpertEntry`,
`load_recipe`, `check_adapters`, `ADAPTER_FAMILIES`, `SPACES`, `model_card`, `to_mergekit`,
`from_mergekit`, `MERGEKIT_METHODS`.
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
from pefteval_harness.merging.recipes import MERGEKIT_METHODS, from_mergekit, model_card, to_mergekit

__all__ = [
    "ADAPTER_FAMILIES",
    "MERGEKIT_METHODS",
    "MERGE_METHODS",
    "SPACES",
    "ExpertEntry",
    "MergeContext",
    "MergeMethod",
    "MergeRecipe",
    "MergeSettings",
    "check_adapters",
    "describe_methods",
    "from_mergekit",
    "get_method",
    "load_recipe",
    "merge_from_config",
    "merge_models",
    "model_card",
    "tensor_generator",
    "to_mergekit",
]

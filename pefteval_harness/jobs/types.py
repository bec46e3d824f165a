"""Typed job configurations: what each kind of job needs to run, and nothing else.

A `Job` is the envelope the planner, runner, store and report share (id, label, lineage, dependencies,
resources); its `config` is one of the kind-specific models below, discriminated on `kind`. Everything
that determines a job's output is in its config, so the job id is a hash of the config (plus the
implementation versions); plan.json and each job's job.json hold these models as JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pefteval_harness.prompting import StrategyConfig

PLAN_SCHEMA = 2  # bump when plan.json / job.json change shape; older stores are refused with a message


class _Frozen(BaseModel):
    # allow_inf_nan: a number field takes no "inf", "nan" or "1e400" (YAML reads those as strings)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- model references ---------------------------------------------------------------------------------


class ArtifactRef(_Frozen):
    """The artifact (model or adapter folder) of another job of the plan."""

    kind: Literal["artifact"] = "artifact"
    job: str


class LocalRef(_Frozen):
    """A model folder on a path every worker sees; `fingerprint` changes when its files change."""

    kind: Literal["local"] = "local"
    path: str
    fingerprint: str


class HubRef(_Frozen):
    """A HuggingFace hub model, pinned at plan time to the commit `revision`."""

    kind: Literal["hub"] = "hub"
    repo: str
    revision: str


ModelRef = Annotated[ArtifactRef | LocalRef | HubRef, Field(discriminator="kind")]


class LoadedModel(_Frozen):
    """What an evaluation loads: a full model, and optionally a peft adapter on top of it."""

    base: ModelRef
    adapter: ModelRef | None = None


# --- what the report needs to know about a model -------------------------------------------------------


class MergeLineage(_Frozen):
    method: str
    experts: list[str]  # the experts' labels
    k: int
    seed: int


class Lineage(_Frozen):
    model: str  # the leaderboard label
    method: str  # "base", a fine-tuning method name, or "merge:<method>"
    base: str  # the base model as the spec names it
    trained_on: list[str] = []
    merge: MergeLineage | None = None
    # A sweep point: the fine-tune or merge it was expanded from, and its values ("config.r": 4, ...).
    sweep_of: str | None = None
    sweep: dict[str, Any] = {}


# --- settings ----------------------------------------------------------------------------------------


class TrainSettings(_Frozen):
    """How a fine-tune is trained. Set once under `train:` in the spec and overridden per fine-tune."""

    tasks: list[str] = Field(default_factory=list, description="task names or globs; their training splits")
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: run all epochs)")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8, description="longest training sequence, in tokens")
    limit: int | None = Field(None, ge=1, description="at most this many training docs per task")
    data_fraction: float = Field(1.0, gt=0, le=1, description="train on this seeded share of the docs of each task")
    warmup: float = Field(0.0, ge=0, description="warm-up steps, or a fraction of all steps if below 1")
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal[  # transformers' SchedulerType names
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "linear"


class DeepSpeedSettings(_Frozen):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    config: dict[str, Any] = Field(default_factory=dict, description="extra DeepSpeed config keys, merged in")


class EvaluateSettings(_Frozen):
    """What lm-eval's `simple_evaluate` takes for one task (names as lm-eval spells them)."""

    limit: int | float | None = Field(None, gt=0, description="docs per task (a fraction if below 1)")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int | str = 8
    # lm-eval's default is 100000: minutes per task for bootstrapped metrics (MCC, F1) even on a few docs;
    # 1000 resamples estimate a standard error to a few per cent.
    bootstrap_iters: int = Field(1000, ge=0, description="resamples for the stderr of non-mean metrics")
    gen_kwargs: dict[str, Any] | None = Field(None, description="generation arguments for generative tasks")
    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    confirm_run_unsafe_code: bool = Field(False, description="let tasks execute model-written code")


# --- job configs, one per kind -----------------------------------------------------------------------


class BaseConfig(_Frozen):
    """Build the embedded tiny model."""

    kind: Literal["base"] = "base"
    builder: Literal["tiny"] = "tiny"
    fingerprint: str


class TrainConfig(_Frozen):
    kind: Literal["train"] = "train"
    method: str
    method_version: int
    peft: dict[str, Any] | None  # the method's parameters (peft config fields); None for full fine-tuning
    deepspeed: DeepSpeedSettings | None
    train: TrainSettings  # tasks: the resolved task names
    task_identities: dict[str, str]
    base: ModelRef
    seed: int
    trust_remote_code: bool
    include_paths: list[str]


class TheorySettings(_Frozen):
    """The theory quantities a merge records (see `pefteval_harness.merging.theory`)."""

    # Draws are cheap (K-dimensional: merging/theory.py); 1024 puts the standard error near 1.5%.
    width_samples: int = Field(1024, ge=2, description="Gaussian draws of the Monte-Carlo Gaussian-width estimate")
    density: float | None = Field(
        None, gt=0, le=1, description="RHT's density for the tail statistics (default: the merge's, else 0.7)"
    )


class MergeConfig(_Frozen):
    kind: Literal["merge"] = "merge"
    method: str
    method_version: int
    parameters: dict[str, Any]  # resolved, defaults filled in
    weights: list[float] | None
    space: Literal["delta_w", "factor"]
    experts: list[str]  # train job ids
    base: ModelRef
    seed: int
    produces: Literal["model", "adapter"]
    theory: TheorySettings | None = None


class JudgeConfig(_Frozen):
    """A local model that scores generated replies on a rubric (see `pefteval_harness.judge`)."""

    model: ModelRef
    rubric: str
    max_new_tokens: int
    batch_size: int


class EvaluateConfig(_Frozen):
    kind: Literal["evaluate"] = "evaluate"
    task: str
    task_identity: str
    model: LoadedModel
    settings: EvaluateSettings
    seed: int
    trust_remote_code: bool
    include_paths: list[str]
    strategy: StrategyConfig | None = None  # None: the task as its YAML states it (no strategy axis)
    judge: JudgeConfig | None = None


# Fields added to job configs after plan schema 2: left out of a job's identity while unset, so the ids
# of jobs that do not use them stay what they were (and stores keep their results).
OPTIONAL_IDENTITY_FIELDS = ("strategy", "judge")


def identity_fields(config: BaseModel) -> dict[str, Any]:
    """A job config as its id hashes it."""
    unset = {name for name in OPTIONAL_IDENTITY_FIELDS if getattr(config, name, None) is None}
    return config.model_dump(mode="json", exclude=unset & set(type(config).model_fields))


class AnalysisSettings(_Frozen):
    """How weight updates are analysed (see `pefteval_harness.analysis`)."""

    rank_tolerance: float = Field(
        1e-3, gt=0, lt=1, description="singular values below this share of the largest one count as zero"
    )
    top_k: int = Field(8, ge=1, description="dimension of the singular subspaces compared with the reference's")


class AnalyzeConfig(_Frozen):
    """Analyse one fine-tune's weight update ΔW against the base and, if given, a reference fine-tune (FFT)."""

    kind: Literal["analyze"] = "analyze"
    method: str  # the fine-tuning method of `model`
    base: ModelRef
    model: LoadedModel  # the fine-tuned model: a full model, or base + adapter
    reference: LoadedModel | None  # the full fine-tune on the same training tasks, when the spec has one
    settings: AnalysisSettings
    trust_remote_code: bool


JobConfig = Annotated[
    BaseConfig | TrainConfig | MergeConfig | EvaluateConfig | AnalyzeConfig, Field(discriminator="kind")
]


class Resources(_Frozen):
    """What one job asks of the cluster (per worker for a gang); Ray places it, the worker enforces the caps."""

    num_cpus: float = Field(1, ge=0, description="CPUs per worker; also the job's torch thread count")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker; a fraction shares a GPU, capped to its share")
    memory_gb: float | None = Field(
        None, gt=0, description="host memory per worker: Ray reserves it, the job's process is held to it"
    )
    accelerator_memory_gb: float | Literal["auto"] | None = Field(
        None, description="accelerator memory the job needs per worker; 'auto': estimated from the model"
    )
    workers: int = Field(1, ge=1, description="train only: a Ray Train gang of this many workers (ranks)")
    placement: Literal["pack", "spread"] = Field("pack", description="a gang's placement over nodes")
    timeout_minutes: float | None = Field(None, gt=0, description="a job still running after this fails: timeout")


class Job(_Frozen):
    id: str
    label: str  # the model's name in the leaderboard
    # What the report says about the model this job makes or scores; derived from the plan's graph, so it
    # is not part of the job id (the config already is).
    lineage: Lineage
    deps: list[str] = []
    resources: Resources = Resources()
    spec_hash: str = ""
    config: JobConfig
    # False: the artifact is deleted once every job that reads it is settled (and rebuilt if one is rerun).
    keep_artifact: bool = True

    @property
    def kind(self) -> str:
        return self.config.kind

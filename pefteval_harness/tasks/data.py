"""Task data for any task family, from local JSON lines or from the HuggingFace hub.

A task YAML loads its data through `custom_dataset: !function utils.load_data` (its folder's utils.py
re-exports `load`), with the parameters in `dataset_kwargs`:

    dataset_kwargs:
      data_key: anli_r1                 # folder under PEFTEVAL_DATA_DIR; may be a sub-path (mgsm/de)
      hf_path: facebook/anli            # the canonical dataset, loaded with datasets.load_dataset
      hf_name: null                     # its config name
      splits: {dev_r1: dev, test_r1: test}   # HF split -> local file stem; a list when the names agree
      holdout: {split: train, into: heldout, fraction: 0.02, fields: [instruction]}   # optional
      optional_splits: [train]          # offline, a missing file is an empty split (see below)

With PEFTEVAL_DATA_DIR set, split `s` is read from `$PEFTEVAL_DATA_DIR/<data_key>/<splits[s]>.jsonl`
(records in the HF schema); otherwise the HF dataset is loaded and only the named splits are kept.
A missing file is an error naming its path, except for `optional_splits`: a task's training split,
which only training and few-shot examples use, may be absent from a sample that holds only the
evaluation records; it is then empty (lm-eval builds its few-shot pool from it at zero shots too) and
training on it fails with the missing path (`missing_file`).
Either way the result is a DatasetDict keyed by the HF split names, so a task's YAML never changes
between a connected cluster and an offline machine.

`holdout` carves an evaluation slice out of a dataset that has only one split (Alpaca): a record
belongs to the slice when a stable hash of its `fields` falls below `fraction`. It is applied after
loading, so the slice is the same online and offline, and train and slice never share a record (nor,
hashing the instruction, an instruction).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import datasets

from pefteval_harness.errors import BadInput

DATA_DIR_ENV = "PEFTEVAL_DATA_DIR"


@dataclass(frozen=True)
class Holdout:
    split: str  # the HF split the slice is carved from; it keeps the rest
    into: str  # the name of the held-out split in the DatasetDict
    fraction: float
    fields: tuple[str, ...]

    def contains(self, record: Mapping[str, Any]) -> bool:
        text = "\x1f".join(str(record[f]) for f in self.fields)
        value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
        return value / 2**64 < self.fraction


@dataclass(frozen=True)
class DataSpec:
    key: str
    hf_path: str
    hf_name: str | tuple[str, ...] | None  # several configs: concatenated per split (MATH's subject types)
    splits: dict[str, str]  # HF split name -> local file stem
    holdout: Holdout | None = None
    hf_revision: str | None = None
    optional: tuple[str, ...] = ()  # splits that may be missing offline (empty instead)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> DataSpec:
        """The spec in a task's dataset_kwargs (other keys, such as lm-eval's metadata, are ignored)."""
        key = kwargs.get("data_key")
        where = f"dataset_kwargs of data key {key!r}"
        if not isinstance(key, str) or not _is_relative(key):
            raise BadInput(f"dataset_kwargs.data_key: expected a relative folder name, got {key!r}")
        path = kwargs.get("hf_path")
        if not isinstance(path, str) or not path:
            raise BadInput(f"{where}: hf_path: expected a dataset id or folder, got {path!r}")
        raw = kwargs.get("splits")
        if isinstance(raw, list):
            raw = {s: s for s in raw}
        if not isinstance(raw, dict) or not raw:
            raise BadInput(f"{where}: splits: expected a list of splits or a mapping of HF split to file stem")
        splits = {str(s): str(f) for s, f in raw.items()}
        for stem in splits.values():
            if not _is_relative(stem):
                raise BadInput(f"{where}: splits: {stem!r} is not a relative file stem")
        name = kwargs.get("hf_name")
        if isinstance(name, list):
            if not name or not all(isinstance(n, str) and n for n in name):
                raise BadInput(f"{where}: hf_name: expected a config name or a non-empty list of them, got {name!r}")
            name = tuple(name)
        return cls(
            key=key,
            hf_path=path,
            hf_name=name,
            splits=splits,
            holdout=_holdout(kwargs.get("holdout"), splits, where),
            hf_revision=kwargs.get("hf_revision"),
            optional=_optional(kwargs.get("optional_splits"), splits, where),
        )

    def local_file(self, root: Path, split: str) -> Path:
        return root / self.key / f"{self.splits[split]}.jsonl"


def _is_relative(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def _optional(raw: Any, splits: dict[str, str], where: str) -> tuple[str, ...]:
    names = tuple(raw or ())
    if not all(isinstance(n, str) and n in splits for n in names):
        raise BadInput(f"{where}: optional_splits: {raw!r} must name listed splits")
    return names


def _holdout(raw: Any, splits: dict[str, str], where: str) -> Holdout | None:
    if raw is None:
        return None
    try:
        holdout = Holdout(
            split=str(raw["split"]),
            into=str(raw["into"]),
            fraction=float(raw["fraction"]),
            fields=tuple(raw["fields"]),
        )
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{where}: holdout: expected {{split, into, fraction, fields}}, got {raw!r}") from None
    if holdout.split not in splits or holdout.into in splits or not 0 < holdout.fraction < 1 or not holdout.fields:
        raise BadInput(f"{where}: holdout: {raw!r} must carve a new split out of a listed one, 0 < fraction < 1")
    return holdout


# ------------------------------------------------------------------------------------------ loading


def load(**kwargs: Any) -> datasets.DatasetDict:
    """The `custom_dataset` hook: lm-eval calls it with the task's metadata and dataset_kwargs (and the
    model arguments), as keyword arguments; only the spec's own keys are read."""
    spec = DataSpec.from_kwargs(kwargs)
    return with_holdout(load_source(spec), spec.holdout)


def data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_source(spec: DataSpec, root: Path | None = None) -> datasets.DatasetDict:
    """The spec's splits as the dataset has them (before any holdout): from `root` (default:
    PEFTEVAL_DATA_DIR) when set, else from the hub."""
    root = root if root is not None else data_dir()
    return load_local(spec, root) if root is not None else load_online(spec)


def _missing_message(spec: DataSpec, path: Path, split: str) -> str:
    return (
        f"{path}: no such file: split {split!r} of data key {spec.key!r} ({spec.hf_path}) is read"
        f" from there because {DATA_DIR_ENV} is set (`pefteval data export` writes it)"
    )


def check_local_files(spec: DataSpec, training: bool, root: Path | None = None) -> None:
    """BadInput naming the first file a task needs and PEFTEVAL_DATA_DIR lacks (nothing when unset): its
    evaluation splits, and for `training` its optional (training) splits too. Planning asks, so a run
    stops before anything runs."""
    root = root if root is not None else data_dir()
    if root is None:
        return
    for split in spec.splits:
        path = spec.local_file(root, split)
        if (training or split not in spec.optional) and not path.is_file():
            raise BadInput(_missing_message(spec, path, split))


def load_local(spec: DataSpec, root: Path) -> datasets.DatasetDict:
    out = {}
    for split in spec.splits:
        path = spec.local_file(root, split)
        if path.is_file():
            out[split] = datasets.Dataset.from_list(_read_jsonl(path))
            continue
        message = _missing_message(spec, path, split)
        if split not in spec.optional:
            raise BadInput(message)
        out[split] = datasets.Dataset.from_list([], info=datasets.DatasetInfo(description=_MISSING + message))
    return datasets.DatasetDict(out)


_MISSING = "pefteval missing file: "


def missing_file(split: datasets.Dataset) -> str | None:
    """Why an optional split is empty: the message naming the file it would have been read from."""
    description = getattr(getattr(split, "info", None), "description", None) or ""
    return description.removeprefix(_MISSING) if description.startswith(_MISSING) else None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return records


def load_online(spec: DataSpec) -> datasets.DatasetDict:
    names = spec.hf_name if isinstance(spec.hf_name, tuple) else (spec.hf_name,)
    configs = []
    for name in names:
        # Asking for the splits by name downloads and prepares only theirs (not ANLI's large train splits).
        try:
            configs.append(
                datasets.load_dataset(spec.hf_path, name, split=list(spec.splits), revision=spec.hf_revision)
            )
        except ValueError as e:
            if not str(e).startswith("Unknown split"):
                raise
            raise BadInput(f"data key {spec.key!r}: {spec.hf_path} ({name}): {str(e).splitlines()[0]}") from None
    parts = [datasets.concatenate_datasets(list(split)) for split in zip(*configs, strict=True)]
    return datasets.DatasetDict(dict(zip(spec.splits, parts, strict=True)))


def with_holdout(dataset: datasets.DatasetDict, holdout: Holdout | None) -> datasets.DatasetDict:
    """`dataset` with `holdout.split` divided into the records kept and the held-out slice."""
    if holdout is None:
        return dataset
    source = dataset[holdout.split]
    columns = {f: list(source[f]) for f in holdout.fields}  # whole columns: fast, no per-row decoding
    held = [holdout.contains({f: columns[f][i] for f in holdout.fields}) for i in range(len(source))]
    out = dict(dataset)
    out[holdout.split] = source.select([i for i, h in enumerate(held) if not h], keep_in_memory=True)
    out[holdout.into] = source.select([i for i, h in enumerate(held) if h], keep_in_memory=True)
    return datasets.DatasetDict(out)


def source_identity(spec: DataSpec, root: Path | None = None) -> str:
    """What the spec's data is, for job identities: the same task YAML reads different records from
    the hub and from a local sample. Offline, a hash of the files' bytes; online, the dataset's id,
    config and revision (the hub's data behind an unpinned revision can still change)."""
    root = root if root is not None else data_dir()
    if root is None:
        return f"hub:{spec.hf_path}:{spec.hf_name}:{spec.hf_revision}"
    digest = hashlib.sha256()
    for split in sorted(spec.splits):
        path = spec.local_file(root, split)
        digest.update(f"{split}\0".encode())
        if path.is_file():  # a missing file fails the job itself, with its own message
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return f"local:{digest.hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------- export


def task_data_specs(manager, names: Iterable[str]) -> dict[str, list[DataSpec]]:
    """The data specs of every named task that loads its data through this module, from its YAML alone
    (nothing is built). Tasks with other data (generated, or lm-eval's own) are left out."""
    from pefteval_harness.tasks import task_config

    specs = {}
    for name in names:
        try:
            found = data_specs(task_config(manager, name))
        except BadInput as e:
            raise BadInput(f"task {name!r}: {e}") from None
        if found:
            specs[name] = found
    return specs


def data_spec(config: Mapping[str, Any]) -> DataSpec | None:
    """The data spec in a resolved task config; None for a task whose data this module does not load."""
    kwargs = config.get("dataset_kwargs")
    return DataSpec.from_kwargs(kwargs) if isinstance(kwargs, Mapping) and "data_key" in kwargs else None


def paired_spec(spec: DataSpec, config_name: str) -> DataSpec:
    """Another config of the spec's dataset, stored in the sibling folder named after it offline (FLORES's
    languages: `flores101/en` and `flores101/fr`)."""
    return replace(spec, key=str(PurePosixPath(spec.key).parent / config_name), hf_name=config_name, holdout=None)


def data_specs(config: Mapping[str, Any]) -> list[DataSpec]:
    """Every dataset a task reads: its spec and, for a paired task (dataset_kwargs.target: a second config
    of the same dataset, as a translation pair's target language), the pair's other side."""
    spec = data_spec(config)
    if spec is None:
        return []
    target = config["dataset_kwargs"].get("target")
    return [spec] if target is None else [spec, paired_spec(spec, str(target))]


def merge_specs(specs: Iterable[DataSpec]) -> list[DataSpec]:
    """One spec per data key, with the union of the splits the tasks read (mnli: matched and mismatched)."""
    merged: dict[str, DataSpec] = {}
    for spec in specs:
        seen = merged.get(spec.key)
        if seen is None:
            merged[spec.key] = DataSpec(spec.key, spec.hf_path, spec.hf_name, dict(spec.splits), None, spec.hf_revision)
            continue
        if (seen.hf_path, seen.hf_name, seen.hf_revision) != (spec.hf_path, spec.hf_name, spec.hf_revision):
            raise BadInput(
                f"data key {spec.key!r} names two datasets: {seen.hf_path} ({seen.hf_name}) and"
                f" {spec.hf_path} ({spec.hf_name})"
            )
        for split, stem in spec.splits.items():
            if seen.splits.setdefault(split, stem) != stem:
                raise BadInput(
                    f"data key {spec.key!r}: split {split!r} is stored as both {seen.splits[split]!r} and {stem!r}"
                )
    return list(merged.values())


def export(specs: Iterable[DataSpec], out: Path) -> list[Path]:
    """Write `<out>/<key>/<stem>.jsonl` for every split of every spec, loaded from the hub (the raw
    splits: a holdout is carved when the data is loaded, so it stays the same offline)."""
    written = []
    for spec in merge_specs(specs):
        dataset = load_online(spec)
        for split, table in dataset.items():
            path = spec.local_file(out, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            with partial.open("w", encoding="utf-8") as f:
                for record in table:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            partial.replace(path)  # a reader never sees half a file
            written.append(path)
    return written

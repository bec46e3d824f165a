"""The cluster configs (cluster/) are checked offline by what reads them, and against each other.

- ray-cluster.yaml: Ray's own cluster-config schema, after Ray fills in the provider's defaults (`ray up`).
- kuberay-rayjob.yaml: every key against KubeRay's RayJob CRD (its openAPIV3Schema, a fixture: unknown
  keys, types, enums, patterns, required fields); the pod templates (images, resource quantities, mounts).
- runtime_env.yaml and the RayJob's runtimeEnvYAML: Ray's RuntimeEnv.
- experiment.yaml, the spec the how-to runs: a valid spec whose jobs fit the KubeRay worker pods.
- cluster/README.md: the files its commands name exist; the versions the configs pin are the tested ones.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster"
CRD = REPO / "tests" / "fixtures" / "kuberay" / "ray.io_rayjobs.schema.json"
GPU = "nvidia.com/gpu"


def _yaml(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


# ---- ray-cluster.yaml ------------------------------------------------------------------------------------


def _prepared_cluster_config() -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(_yaml("ray-cluster.yaml"))  # the provider's defaults merged in, as `ray up` does


def test_ray_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import validate_config

    config = _prepared_cluster_config()
    validate_config(config)
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == gpu["max_workers"] >= 2  # fixed size, room for a 2-worker gang
    assert config["max_workers"] >= gpu["max_workers"]

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_worker"] = 1  # a typo Ray must refuse
    with pytest.raises(Exception, match="min_worker"):
        validate_config(broken)


def _pins(commands: list[str]) -> dict[str, str]:
    """package -> version pinned with == in pip commands (extras dropped)."""
    return {m[1]: m[2] for c in commands for m in re.finditer(r'"?([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^"\s]+)', c)}


def test_configs_pin_the_versions_the_project_is_tested_with():
    from importlib.metadata import version

    config = _yaml("ray-cluster.yaml")
    pins = _pins(config["setup_commands"])
    assert pins["ray"] == version("ray")
    assert pins["torch"] == version("torch").split("+")[0]
    assert any("pip install -e ." in c for c in config["setup_commands"])  # the package itself, on every node

    rayjob = _yaml("kuberay-rayjob.yaml")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == version("ray")
    header = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert f"rayproject/ray:{version('ray')}-" in header and f'"torch=={pins["torch"]}"' in header


# ---- kuberay-rayjob.yaml against the CRD ---------------------------------------------------------------


def _strict(schema):
    """The CRD's schema with unknown keys refused where the API server would prune them (structural
    schemas: an object with `properties` keeps only those, unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def crd_errors(manifest: dict) -> list[str]:
    """Every place where the manifest disagrees with the RayJob CRD: `path: message`."""
    import jsonschema

    crd = json.loads(CRD.read_text())
    assert (manifest.get("apiVersion"), manifest.get("kind")) == (crd["apiVersion"], crd["kind"])
    validator = jsonschema.Draft7Validator(_strict(crd["openAPIV3Schema"]))
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors]


def test_kuberay_rayjob_follows_the_crd():
    assert crd_errors(_yaml("kuberay-rayjob.yaml")) == []


def test_crd_check_finds_unknown_keys_wrong_types_and_missing_fields():
    manifest = _yaml("kuberay-rayjob.yaml")
    group = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # misspelt, deep in the pod template
    group["replicas"] = "2"
    del group["groupName"]
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["memory"] = "8 GB"  # not a Kubernetes quantity
    manifest["spec"]["rayClusterSpec"]["upgradeStrategy"] = {"type": "Rolling"}  # not in the enum
    errors = "\n".join(crd_errors(manifest))
    assert "containers.0: Additional properties are not allowed ('resource' was unexpected)" in errors, errors
    assert "workerGroupSpecs.0.replicas: '2' is not of type 'integer'" in errors, errors
    assert "workerGroupSpecs.0: 'groupName' is a required property" in errors, errors
    assert "limits.memory: '8 GB' does not match" in errors, errors
    assert "upgradeStrategy.type: 'Rolling' is not one of" in errors, errors


# ---- kuberay-rayjob.yaml: pod templates ----------------------------------------------------------------

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}  # fmt: skip


def quantity(value) -> Decimal:
    """A Kubernetes resource quantity ("500m", "28Gi", 1) as a number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?", str(value))
    assert match, f"{value!r} is not a Kubernetes quantity"
    number, suffix = Decimal(match[1]), match[2] or ""
    return number * (Decimal(10) ** int(suffix[1:]) if suffix[:1] in "eE" and suffix else Decimal(_SUFFIX[suffix]))


def test_quantity_parses_what_kubernetes_writes():
    assert quantity("500m") == Decimal("0.5") and quantity("28Gi") == 28 * 2**30 and quantity(1) == 1
    assert quantity("1e3") == 1000
    with pytest.raises(AssertionError):
        quantity("8 GB")


def _groups(manifest: dict) -> list[tuple[str, dict]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def test_kuberay_pod_templates_are_well_formed():
    manifest = _yaml("kuberay-rayjob.yaml")
    images = set()
    for name, group in _groups(manifest):
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert container.get("image"), f"{where}: no image"
            images.add(container["image"])
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests), f"{where}: requests without cpu or memory"
            for resource, amount in requests.items():
                assert resource in limits, f"{where}: {resource} requested without a limit"
                assert quantity(amount) <= quantity(limits[resource]), f"{where}: {resource} request > limit"
            if GPU in limits:  # an extended resource: Kubernetes requires request == limit
                assert quantity(requests.get(GPU, limits[GPU])) == quantity(limits[GPU]), where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mounts {mount['name']!r}, not a volume of the pod"
    assert len(images) == 1, f"head and workers must run one image, not {images}"
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # jobs run on the workers; the driver on the head
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)


def _entrypoint(manifest: dict) -> tuple[str, str]:
    """The spec file and output of the RayJob's `pefteval run SPEC --output OUT`."""
    args = shlex.split(manifest["spec"]["entrypoint"])
    assert args[:2] == ["pefteval", "run"], args
    return args[2], args[args.index("--output") + 1]


def test_kuberay_entrypoint_runs_the_example_spec_into_shared_storage():
    manifest = _yaml("kuberay-rayjob.yaml")
    spec_path, output = _entrypoint(manifest)
    assert (CLUSTER / Path(spec_path).name).is_file(), f"{spec_path}: the ConfigMap is made from cluster/"
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_mounts = [m["mountPath"] for m in head["volumeMounts"]]
    assert any(Path(spec_path).is_relative_to(m) for m in head_mounts), f"{spec_path} is not mounted on the head"
    # Every pod mounts the output's volume (a job writes where it runs); an object-store URL needs none.
    if "://" not in output:
        for name, group in _groups(manifest):
            mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c["volumeMounts"]]
            assert any(Path(output).is_relative_to(m) for m in mounts), f"{name} pods do not mount {output}"


# ---- runtime envs ----------------------------------------------------------------------------------------


def _runtime_env(fields: dict):
    from ray.runtime_env import RuntimeEnv

    unknown = set(fields) - RuntimeEnv.known_fields  # RuntimeEnv would take them as plugin names
    assert not unknown, f"not runtime_env fields: {sorted(unknown)}"
    return RuntimeEnv(**fields)  # checks each field's type (env_vars: str -> str, ...)


def test_runtime_envs_are_accepted_by_ray():
    env = _runtime_env(_yaml("runtime_env.yaml"))
    # The nodes' installed package runs, never an uploaded copy of it (cluster/README.md).
    assert {"/pefteval_harness/", "/task_configs/"} <= set(env["excludes"])
    embedded = _runtime_env(yaml.safe_load(_yaml("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"]))
    assert embedded["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    with pytest.raises(TypeError, match="env_vars"):
        _runtime_env({"env_vars": {"HF_HUB_OFFLINE": 1}})  # unquoted YAML numbers are not strings


# ---- the example spec against the cluster ------------------------------------------------------------------


def test_example_spec_is_valid_and_its_jobs_fit_the_worker_pods():
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION

    from pefteval_harness.spec import load_spec

    manifest = _yaml("kuberay-rayjob.yaml")
    spec, _ = load_spec(CLUSTER / Path(_entrypoint(manifest)[0]).name)
    gangs = [ft.resources for ft in spec.finetunes.values() if ft.resources.get("workers", 1) > 1]
    assert gangs and all(g.get("placement") == "spread" for g in gangs)  # the how-to shows a spread gang
    assert 0 < spec.resources.evaluate.accelerator_memory_gb <= spec.resources.gpu_memory_gb

    pod = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = pod["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Ray's `memory` resource on a pod: its memory less the object store's default share.
    memory_gb = float(quantity(limits["memory"])) / 2**30 * (1 - DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)
    share = spec.resources.evaluate.accelerator_memory_gb / spec.resources.gpu_memory_gb
    for kind, r in [("train", spec.resources.train), ("evaluate", spec.resources.evaluate)]:
        gpus = r.num_gpus or share
        assert r.num_cpus <= float(quantity(limits["cpu"])), f"{kind}: more CPUs than a worker pod has"
        assert gpus <= float(quantity(limits[GPU])), f"{kind}: more GPUs than a worker pod has"
        assert (r.memory_gb or 0) <= memory_gb, f"{kind}: more memory than Ray sees on a worker pod"
    assert max(g["workers"] for g in gangs) <= pod["replicas"]  # a spread gang: one rank per pod


# ---- cluster/README.md -------------------------------------------------------------------------------------


def _readme_commands() -> list[list[str]]:
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_readme_commands_name_files_that_exist():
    named = set()
    for args in _readme_commands():
        for arg in args:
            value = arg.split("=", 1)[-1]
            if re.search(r"\.(ya?ml|md|py|json)$", value) and not value.startswith(("/", "~", "$", "<")):
                if "://" not in value:
                    named.add(value)
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"cluster/README.md names files that do not exist: {missing}"
    for config in ("cluster/ray-cluster.yaml", "cluster/kuberay-rayjob.yaml", "cluster/runtime_env.yaml"):
        assert config in named, f"cluster/README.md shows no command with {config}"

"""Static checks of the deployment files under ``cluster/``.

No Ray, docker, Kubernetes or network: the YAML is parsed with PyYAML, the Dockerfile
and README are read as text, and every ``bergson-ray`` command line found in them is
parsed with the real CLI parser (``bergson_ray.cli.main.make_parser``). Commands whose
module does not exist yet are skipped, not failed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import json
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bergson_ray.cli.main import COMMANDS, make_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "ray-cluster.gpu.yaml"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob-build-score.yaml"
PVC = KUBERAY / "pvc.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
README = CLUSTER / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

SHARED = "/mnt/shared"
"""Where every node sees the shared file system (run outputs + HF cache)."""
PROG = "bergson-ray"
IMAGE_REPO = "bergson-ray"
"""Last path component of the image built from cluster/Dockerfile."""
RUN_PATH_COMMANDS = {"build", "reduce", "score", "hessian", "ekfac", "serve"}
"""Commands whose first positional argument is a run path / store on the shared volume."""
PATH_FLAGS = ("--query_path", "--index")
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://")
PLACEHOLDER = re.compile(r"CHANGE_ME_[A-Z0-9_]+")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}

YAML_FILES = sorted({*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")})


# --------------------------------------------------------------------------- helpers


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def load_docs(path: Path) -> tuple[Any, ...]:
    """Every non-empty YAML document of ``path`` (multi-document aware)."""
    with open(path, encoding="utf-8") as fh:
        return tuple(d for d in yaml.safe_load_all(fh) if d is not None)


def k8s_objects(kind: str | None = None) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(KUBERAY.glob("*.y*ml")):
        for doc in load_docs(path):
            if isinstance(doc, dict) and (kind is None or doc.get("kind") == kind):
                out.append((path, doc))
    return out


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of every RayCluster and of every RayJob/RayService's cluster."""
    specs = []
    for path, obj in k8s_objects():
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        label = f"{path.name}:{kind}/{(obj.get('metadata') or {}).get('name')}"
        if kind == "RayCluster":
            specs.append((label, spec))
        elif kind == "RayJob" and "rayClusterSpec" in spec:
            specs.append((label, spec["rayClusterSpec"]))
        elif kind == "RayService" and "rayClusterConfig" in spec:
            specs.append((label, spec["rayClusterConfig"]))
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    for group in spec.get("workerGroupSpecs") or []:
        out.append((f"worker group {group.get('groupName')}", group["template"]))
    return out


def all_pod_templates() -> list[tuple[str, dict]]:
    return [
        (f"{label} {name}", tpl)
        for label, spec in ray_cluster_specs()
        for name, tpl in pod_templates(spec)
    ]


def image_name(ref: str) -> str:
    """``registry/org/bergson-ray:tag`` or ``...@sha256:..`` -> ``registry/org/bergson-ray``."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def image_tag(ref: str) -> str:
    last = ref.split("@", 1)[0].rpartition("/")[2]
    return last.split(":", 1)[1] if ":" in last else "latest"


def quantity(value: Any) -> float:
    return float(str(value))


def dockerfile_args() -> dict[str, str]:
    """First default of every ``ARG NAME=default`` in the Dockerfile."""
    args: dict[str, str] = {}
    for m in re.finditer(r"^ARG\s+(\w+)(?:=(\S*))?\s*$", DOCKERFILE.read_text(), re.M):
        if m.group(2) is not None:
            args.setdefault(m.group(1), m.group(2).strip("\"'"))
    return args


def walk_strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v)


# ------------------------------------------------------- bergson-ray command lines


@dataclass(frozen=True)
class Invocation:
    source: str
    argv: tuple[str, ...]
    """Arguments after ``bergson-ray``."""
    full: bool
    """Parse with the real parser (False: only check the command and flag names, for
    prose, comments and inline code that may leave out required arguments)."""

    def __str__(self) -> str:
        return f"{self.source}: {PROG} {shlex.join(self.argv)}"


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\[ \t]*\n", " ", text).splitlines()


def extract(text: str, source: str, *, full: bool, comment: bool = False) -> list[Invocation]:
    """Every ``bergson-ray ...`` command in shell-like ``text``.

    A word ``bergson-ray`` starts an invocation in command position: the first word, after
    ``&&``/``||``/``|``/``;``/``(``, after ``--`` (``ray job submit ... -- bergson-ray``)
    or after ``VAR=value`` prefixes, or right after an image reference (``docker run
    IMAGE bergson-ray ...``). Elsewhere it is an argument (``kubectl get secret
    bergson-ray``). In comments (``comment=True``) it must also be followed by a known
    command or an option, and ``;`` does not start a command, so that prose such as
    "...; bergson-ray runs one worker per GPU" is not taken for a command.
    An invocation ends at a shell separator or redirection. A quoted word holding a
    command (``ray exec cfg 'bergson-ray status'``) is searched recursively.
    """
    found: list[Invocation] = []
    for line in _logical_lines(text):
        if PROG not in line:
            continue
        try:
            toks = _tokens(line)
        except ValueError as exc:
            raise AssertionError(f"{source}: cannot tokenize {line!r}: {exc}") from exc
        command_pos = True
        i = 0
        while i < len(toks):
            tok = toks[i]
            if tok != PROG and f"{PROG} " in tok:  # a quoted command line
                found += extract(tok, source, full=full, comment=comment)
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            after_image = i > 0 and re.fullmatch(r"[\w.\-/]+/[\w.\-]+:[\w.\-]+", toks[i - 1])
            if (
                tok == PROG
                and (command_pos or after_image)
                and (not comment or nxt in COMMANDS or nxt.startswith("-"))
            ):
                j = i + 1
                while j < len(toks) and not re.fullmatch(r"[;&|()<>]+", toks[j]):
                    j += 1
                argv = tuple(toks[i + 1 : j])
                partial = not full or "..." in argv or any("…" in a for a in argv)
                if argv:
                    found.append(Invocation(source, argv, not partial))
                i = j
                continue
            if tok in ("&&", "||", "|", "(", ")") or tok == "--" or (tok == ";" and not comment):
                command_pos = True
            elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tok):
                command_pos = False
            i += 1
    return found


def _comment_text(text: str) -> str:
    """The comment lines of a YAML file or Dockerfile, markers stripped."""
    return "\n".join(line.strip()[1:] for line in text.splitlines() if line.strip().startswith("#"))


def _readme_invocations() -> list[Invocation]:
    text = README.read_text(encoding="utf-8")
    found: list[Invocation] = []
    fence = re.compile(r"^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\1```", re.S | re.M)
    for m in fence.finditer(text):
        lang, body = m.group(2).lower(), textwrap.dedent(m.group(3))
        line = text[: m.start()].count("\n") + 2
        src = f"{_rel(README)}:{line}"
        if lang in ("python", "py"):
            try:
                tree = ast.parse(body)
            except SyntaxError:  # reported by test_readme_python_blocks_compile
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found += extract(node.value, src, full=True)
        elif lang in ("", "bash", "sh", "shell", "console", "zsh"):
            code = "\n".join(ln for ln in body.splitlines() if not ln.lstrip().startswith("#"))
            found += extract(code, src, full=True)
            found += extract(_comment_text(body), src, full=False, comment=True)
    prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        if PROG in m.group(1):
            src = f"{_rel(README)}:{prose[: m.start()].count(chr(10)) + 1}"
            found += extract(m.group(1), src, full=False)
    return found


def _yaml_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for path in YAML_FILES:
        for doc in load_docs(path):
            for s in walk_strings(doc):
                found += extract(s, _rel(path), full=True)
        found += extract(
            _comment_text(path.read_text(encoding="utf-8")),
            f"{_rel(path)} (comments)",
            full=False,
            comment=True,
        )
    return found


def _dockerfile_invocations() -> list[Invocation]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    return extract(code, _rel(DOCKERFILE), full=True) + extract(
        _comment_text(text), f"{_rel(DOCKERFILE)} (comments)", full=False, comment=True
    )


def collect_invocations() -> list[Invocation]:
    out: list[Invocation] = []
    for fn, path in (
        (_yaml_invocations, CLUSTER),
        (_readme_invocations, README),
        (_dockerfile_invocations, DOCKERFILE),
    ):
        if path.exists():
            out += fn()
    return out


INVOCATIONS = collect_invocations()


@functools.lru_cache(maxsize=1)
def cli() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = make_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, (dict(subs[0].choices) if subs else {})


def flag_value(argv: tuple[str, ...] | list[str], flag: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == flag:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- files and YAML


def test_expected_files_exist():
    for path in (LAUNCHER, RAYCLUSTER, RAYJOB, PVC, DOCKERFILE, README):
        assert path.is_file(), f"missing {_rel(path)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=[_rel(p) for p in YAML_FILES])
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: every document must be a mapping"
        if path.is_relative_to(KUBERAY):
            assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: apiVersion/kind"
            name = (doc.get("metadata") or {}).get("name", "")
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (
                f"{_rel(path)}: metadata.name {name!r} is not a DNS-1035 label"
            )


# ------------------------------------------------------------------- KubeRay


def _check_ray_start_params(where: str, params: Any) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    for key, val in params.items():
        # map[string]string in the CRD: an unquoted 0 or true is rejected by the API server
        assert isinstance(val, str), f"{where}: rayStartParams[{key!r}] must be a quoted string"


def _check_cluster_spec(label: str, spec: dict) -> None:
    assert spec.get("rayVersion") == dockerfile_args().get("RAY_VERSION"), (
        f"{label}: rayVersion must equal the Dockerfile's RAY_VERSION"
    )
    assert (spec.get("authOptions") or {}).get("mode") == "token", (
        f"{label}: enable Ray token auth (authOptions.mode: token)"
    )
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{label}: headGroupSpec"
    _check_ray_start_params(f"{label} head", head.get("rayStartParams"))
    # the RayJob submitter and port-forwards reach the dashboard through the head Service
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", (
        f"{label}: head rayStartParams.dashboard-host must be 0.0.0.0"
    )
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0].get("image"), f"{label}: head container image"

    groups = spec.get("workerGroupSpecs")
    assert groups, f"{label}: workerGroupSpecs"
    gpu_groups = 0
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for g in groups:
        where = f"{label} worker group {g.get('groupName')!r}"
        assert g.get("groupName"), f"{where}: groupName"
        _check_ray_start_params(where, g.get("rayStartParams"))
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling:
            assert lo is not None and hi is not None, f"{where}: min/maxReplicas"
        if lo is not None and hi is not None:
            assert 0 <= lo <= hi, f"{where}: minReplicas <= maxReplicas"
            assert lo <= g.get("replicas", lo) <= hi, f"{where}: replicas in [min, max]"
        ctrs = g["template"]["spec"]["containers"]
        assert ctrs and ctrs[0].get("image"), f"{where}: container image"
        limits = (ctrs[0].get("resources") or {}).get("limits") or {}
        if "nvidia.com/gpu" in limits:
            gpus = quantity(limits["nvidia.com/gpu"])
            assert gpus >= 1 and gpus == int(gpus), f"{where}: whole GPUs in limits"
            requests = (ctrs[0].get("resources") or {}).get("requests") or {}
            if "nvidia.com/gpu" in requests:
                assert quantity(requests["nvidia.com/gpu"]) == gpus, f"{where}: GPU request"
            assert not image_tag(ctrs[0]["image"]).endswith("cpu"), (
                f"{where}: GPU pods need the GPU image, not a -cpu tag"
            )
            gpu_groups += 1
    assert gpu_groups, f"{label}: no worker group has a nvidia.com/gpu limit"


def test_raycluster_required_fields():
    objs = k8s_objects("RayCluster")
    assert objs, "no RayCluster in cluster/kuberay"
    for path, obj in objs:
        assert obj["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion must be ray.io/v1"
        _check_cluster_spec(f"{path.name}:RayCluster", obj["spec"])


def test_rayjob_required_fields():
    objs = k8s_objects("RayJob")
    assert objs, "no RayJob in cluster/kuberay"
    for path, obj in objs:
        spec = obj["spec"]
        assert obj["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion must be ray.io/v1"
        assert isinstance(spec.get("entrypoint"), str) and PROG in spec["entrypoint"]
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{path.name}: shutdownAfterJobFinishes must be true (GPU clusters cost money)"
        )
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        assert isinstance(ttl, int) and ttl >= 0
        assert isinstance(spec.get("rayClusterSpec"), dict), f"{path.name}: rayClusterSpec"
        _check_cluster_spec(f"{path.name}:RayJob", spec["rayClusterSpec"])


def test_rayjob_cluster_matches_raycluster():
    """The RayJob's cluster runs the same pods as raycluster.yaml (replica counts aside)."""
    clusters = [o for p, o in k8s_objects("RayCluster") if p == RAYCLUSTER]
    assert clusters, f"no RayCluster in {_rel(RAYCLUSTER)}"
    ref = clusters[0]["spec"]
    ref_groups = {g["groupName"]: g for g in ref["workerGroupSpecs"]}
    for path, job in k8s_objects("RayJob"):
        spec = job["spec"]["rayClusterSpec"]
        for key in ("rayVersion", "authOptions"):
            assert spec.get(key) == ref.get(key), f"{path.name}: {key} differs from RayCluster"
        head, ref_head = spec["headGroupSpec"], ref["headGroupSpec"]
        assert head["rayStartParams"] == ref_head["rayStartParams"], f"{path.name}: head params"
        assert head["template"] == ref_head["template"], f"{path.name}: head pod template"
        for g in spec["workerGroupSpecs"]:
            assert g["groupName"] in ref_groups, f"{path.name}: unknown group {g['groupName']}"
            r = ref_groups[g["groupName"]]
            assert g["rayStartParams"] == r["rayStartParams"], f"{path.name}: worker params"
            assert g["template"] == r["template"], f"{path.name}: worker pod template"


def test_rayjob_entrypoint_is_a_consistent_pipeline():
    for path, job in k8s_objects("RayJob"):
        entry = job["spec"]["entrypoint"]
        toks = _tokens(" ".join(_logical_lines(entry)))
        seps = [t for t in toks if re.fullmatch(r"[;&|()]+", t)]
        assert all(s == "&&" for s in seps), f"{path.name}: chain steps with && (got {seps})"
        steps = extract(entry, path.name, full=True)
        cmds = [s.argv[0] for s in steps]
        assert "build" in cmds and "score" in cmds, f"{path.name}: build and score steps"
        produced: list[str] = []
        for step in steps:
            cmd = step.argv[0]
            if cmd == "score":
                qp = flag_value(step.argv, "--query_path")
                assert qp in produced, (
                    f"{path.name}: score --query_path {qp!r} is not written by an earlier step"
                )
            if cmd in RUN_PATH_COMMANDS and len(step.argv) > 1:
                produced.append(step.argv[1])
        # query and corpus gradients must come from the same model and projection
        for flag in ("--model", "--projection_dim"):
            values = {flag_value(s.argv, flag) for s in steps}
            assert len(values) == 1, f"{path.name}: steps disagree on {flag}: {values}"


def test_pvc_is_read_write_many():
    pvcs = k8s_objects("PersistentVolumeClaim")
    assert pvcs, "no PersistentVolumeClaim in cluster/kuberay"
    for path, pvc in pvcs:
        spec = pvc["spec"]
        assert "ReadWriteMany" in spec.get("accessModes", []), f"{path.name}: ReadWriteMany"
        assert spec["resources"]["requests"]["storage"], f"{path.name}: storage request"


def test_shared_volume_mounted_in_every_pod_template():
    claims = {pvc["metadata"]["name"] for _, pvc in k8s_objects("PersistentVolumeClaim")}
    templates = all_pod_templates()
    assert templates
    for where, tpl in templates:
        pod = tpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for ctr in pod["containers"]:
            mounts = [m for m in ctr.get("volumeMounts") or [] if m.get("mountPath") == SHARED]
            assert mounts, f"{where}: container {ctr['name']} does not mount {SHARED}"
            mount = mounts[0]
            assert not mount.get("readOnly"), f"{where}: {SHARED} must be writable"
            vol = volumes.get(mount["name"])
            assert vol, f"{where}: no volume {mount['name']!r}"
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            assert claim in claims, (
                f"{where}: {SHARED} must come from the shared PVC {sorted(claims)}, got {vol}"
            )


# ---------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    docs = load_docs(LAUNCHER)
    assert len(docs) == 1, f"{_rel(LAUNCHER)} must hold exactly one document"
    return docs[0]


def test_launcher_required_fields(launcher):
    assert launcher.get("cluster_name")
    assert (launcher.get("provider") or {}).get("type")
    types = launcher.get("available_node_types")
    assert isinstance(types, dict) and types, "available_node_types"
    assert launcher.get("head_node_type") in types, "head_node_type must be a node type"
    assert (launcher.get("docker") or {}).get("image"), "docker.image"
    top = launcher.get("max_workers")
    gpu_types = []
    for name, nt in types.items():
        assert "node_config" in nt and "resources" in nt, f"{name}: node_config/resources"
        if name == launcher["head_node_type"]:
            continue
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers", top)
        assert 0 <= lo <= hi, f"{name}: min_workers <= max_workers"
        if top is not None:
            assert hi <= top, f"{name}: max_workers above the cluster's max_workers"
        if quantity((nt.get("resources") or {}).get("GPU", 0)) > 0:
            gpu_types.append(name)
    assert gpu_types, "no worker node type with GPUs"


def test_launcher_start_commands(launcher):
    head = " ".join(launcher.get("head_start_ray_commands") or [])
    worker = " ".join(launcher.get("worker_start_ray_commands") or [])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    m = re.search(r"--dashboard-host[= ](\S+)", head)
    assert m, "head_start_ray_commands must bind the dashboard explicitly (--dashboard-host)"
    assert m.group(1) in ("127.0.0.1", "localhost", "0.0.0.0")
    assert "ray start --address=$RAY_HEAD_IP:" in worker


def test_launcher_shared_storage_and_auth(launcher):
    docker = launcher["docker"]
    opts = (
        " ".join(docker.get("run_options") or [])
        + " "
        + " ".join(
            (docker.get("head_run_options") or []) + (docker.get("worker_run_options") or [])
        )
    )
    assert re.search(rf"(-v|--volume)[ =]{SHARED}:{SHARED}(\s|:|$)", opts), (
        f"the container must see the host's {SHARED} at the same path"
    )
    init = " ".join(launcher.get("initialization_commands") or [])
    assert re.search(rf"mount\b.*\s{SHARED}(\s|$)", init), f"the host must mount {SHARED}"
    assert "RAY_AUTH_MODE=token" in opts, "run the containers with RAY_AUTH_MODE=token"
    assert any("auth_token" in k for k in (launcher.get("file_mounts") or {})), (
        "sync the Ray auth token to every node (file_mounts)"
    )


def _ray_schema_path() -> Path | None:
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return path if path.is_file() else None


def test_launcher_matches_ray_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    path = _ray_schema_path()
    if path is None:
        pytest.skip("ray's autoscaler/ray-schema.json is not installed")
    jsonschema.validate(launcher, json.loads(path.read_text()))


# ----------------------------------------------------------------- images


def _documented_image_refs() -> list[tuple[str, str]]:
    refs = []
    for path in (README, DOCKERFILE):
        text = re.sub(r"\\[ \t]*\n", " ", path.read_text(encoding="utf-8"))
        for m in re.finditer(r"(?:\s-t|\s--tag|docker push|docker pull)[ =]+(\S+)", text):
            refs.append((_rel(path), m.group(1).strip("`'\"")))
        for m in re.finditer(r"docker run\b[^\n]*?\s([\w.\-/]*:[\w.\-]+)\s", text):
            refs.append((_rel(path), m.group(1)))
    return refs


def test_one_image_everywhere(launcher):
    refs: list[tuple[str, str]] = []
    for where, tpl in all_pod_templates():
        for ctr in tpl["spec"]["containers"]:
            refs.append((where, ctr["image"]))
    docker = launcher["docker"]
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            refs.append((f"{_rel(LAUNCHER)} docker.{key}", docker[key]))
    refs += _documented_image_refs()
    names = {image_name(ref) for _, ref in refs}
    assert len(names) == 1, "different images across files:\n" + "\n".join(
        f"  {w}: {r}" for w, r in refs
    )
    (name,) = names
    assert name.rsplit("/", 1)[-1] == IMAGE_REPO, f"image should be .../{IMAGE_REPO}: {name}"


# -------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_and_build_args():
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and froms[0].startswith("rayproject/ray:"), "base on an official Ray image"
    args = dockerfile_args()
    # the tag is built from ARGs so CPU and GPU builds come from one file
    for arg in ("RAY_VERSION", "RAY_PLATFORM"):
        assert f"${{{arg}}}" in froms[0], f"FROM tag must use ${{{arg}}}"
    assert args.get("RAY_PLATFORM") == "gpu", "default build is the GPU variant"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args.get("RAY_VERSION", "")), "pin RAY_VERSION"
    assert "TORCH_INDEX_URL" in re.findall(r"^ARG\s+(\w+)", text, re.M)
    assert re.search(r"pip install[^\n]*--index-url", text), "torch from a chosen wheel index"
    assert "download.pytorch.org/whl/cpu" in text


def test_dockerfile_installs_the_package():
    text = DOCKERFILE.read_text(encoding="utf-8")
    run_text = re.sub(r"\\[ \t]*\n", " ", text)
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+(\S+)", text, re.M)
    assert any(src == "." for src, _ in copies), "copy the build context (the repository)"
    dests = [dst for src, dst in copies if src == "."]
    installs = re.findall(r"pip install[^\n;&]*", run_text)
    assert any(
        re.search(rf"(\s|\"|'){re.escape(d)}(\[|\s|\"|'|$)", i) for i in installs for d in dests
    ), "pip install the copied package"
    assert "faiss-gpu" in text, "GPU builds install the faiss-gpu extra"
    extras = re.search(
        r"\[project\.optional-dependencies\](.*?)(^\[|\Z)", PYPROJECT.read_text(), re.S | re.M
    )
    assert extras and re.search(r"^faiss-gpu\s*=", extras.group(1), re.M), (
        "pyproject has no faiss-gpu extra"
    )


def test_dockerfile_uses_shared_cache_and_downloads_nothing():
    text = DOCKERFILE.read_text(encoding="utf-8")
    m = re.search(r"\bHF_HOME=(\S+)", text)
    assert m and m.group(1).startswith(SHARED + "/"), f"HF_HOME must live under {SHARED}"
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    for forbidden in (
        "snapshot_download",
        "from_pretrained",
        "hf_hub_download",
        "huggingface-cli download",
        "hf download",
        "load_dataset",
        f"{PROG} quickstart",
        f"{PROG} build",
    ):
        assert forbidden not in code, f"the image must not download models ({forbidden})"


def test_dockerfile_ignore_keeps_the_package():
    if not DOCKERIGNORE.exists():
        pytest.skip("no Dockerfile-specific ignore file")
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    if "*" in rules:
        for needed in ("pyproject.toml", "bergson_ray"):
            assert f"!{needed}" in rules, f"{_rel(DOCKERIGNORE)} drops {needed}"


def _console_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(PYPROJECT, "rb") as fh:
        return tomllib.load(fh)["project"].get("scripts", {})


def test_console_script_is_what_the_image_runs():
    scripts = _console_scripts()
    assert scripts.get(PROG) == "bergson_ray.cli.main:entry"
    text = DOCKERFILE.read_text(encoding="utf-8")
    entry = re.findall(r"^(?:ENTRYPOINT|CMD)\s+(.*)$", text, re.M)
    in_entry = any(PROG in e for e in entry)
    run_text = re.sub(r"\\[ \t]*\n", " ", text)
    checked_in_build = any(PROG in r for r in re.findall(r"^RUN\s+(.*)$", run_text, re.M))
    assert in_entry or checked_in_build, (
        f"the Dockerfile should run or check the `{PROG}` console script"
    )
    assert PROG in README.read_text(encoding="utf-8")


# ------------------------------------------------------------------ README


def test_readme_python_blocks_compile():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", text, re.S | re.M)
    assert blocks
    for _indent, block in blocks:
        compile(textwrap.dedent(block), str(README), "exec")


def test_placeholders_are_documented():
    readme = README.read_text(encoding="utf-8")
    for path in [*YAML_FILES, DOCKERFILE]:
        for ph in sorted(set(PLACEHOLDER.findall(path.read_text(encoding="utf-8")))):
            assert ph in readme, f"{_rel(path)}: placeholder {ph} is not explained in README"


# ------------------------------------------------------- CLI command lines


def test_command_lines_found():
    sources = {inv.source.split(":")[0].split(" ")[0] for inv in INVOCATIONS}
    assert _rel(RAYJOB) in sources, "no bergson-ray command in the RayJob"
    assert _rel(README) in sources, "no bergson-ray command in the README"


@pytest.mark.parametrize("inv", INVOCATIONS, ids=[f"{i.source}-{i.argv[0]}" for i in INVOCATIONS])
def test_command_line_is_accepted_by_cli(inv: Invocation):
    parser, subparsers = cli()
    argv = list(inv.argv)
    if argv[0].startswith("-"):  # top-level options only (bergson-ray --help)
        for tok in argv:
            if tok.startswith("--"):
                assert tok.split("=")[0] in parser._option_string_actions, f"{inv}: {tok}"
        return
    cmd = argv[0]
    assert cmd in COMMANDS, f"{inv}: unknown command {cmd!r} (known: {sorted(COMMANDS)})"
    if cmd not in subparsers:
        pytest.skip(f"`{PROG} {cmd}` is not implemented yet ({COMMANDS[cmd]} is missing)")
    sub = subparsers[cmd]
    for tok in argv[1:]:
        if tok == "--":
            break
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            # exact names: argparse would also accept unambiguous prefixes
            assert flag in sub._option_string_actions, f"{inv}: `{cmd}` has no option {flag}"
    if cmd in RUN_PATH_COMMANDS and inv.full:
        path = argv[1] if len(argv) > 1 else ""
        assert path.startswith(SHARED + "/") or path.startswith(URI_SCHEMES), (
            f"{inv}: run path {path!r} must be on the shared volume {SHARED}"
        )
    for flag in PATH_FLAGS:
        val = flag_value(argv, flag)
        if val and inv.full:
            assert val.startswith(SHARED + "/") or val.startswith(URI_SCHEMES), (
                f"{inv}: {flag} {val!r} must be on the shared volume {SHARED}"
            )
    if not inv.full:
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            pytest.fail(f"{inv}\nrejected by the CLI parser:\n{err.getvalue()}")

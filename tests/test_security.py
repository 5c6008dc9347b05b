"""Security review, enforced: no unpickling, code evaluation or shell in our code; config is data;
model files are loaded weights only; Ray's dashboard and job server stay off or on loopback.

Static checks walk the syntax tree of every .py file under pipeline/ and jobs/; behaviour checks
feed code-shaped config values and a booby-trapped model file to the real loaders. No Ray is started.
"""

from __future__ import annotations

import ast
import os
import pathlib
import pickle
import re

import pytest
import torch
import yaml

from jobs import _cli
from pipeline.config import ConfigError, from_dict, load_config
from pipeline.models.store import load_exported

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(p for package in ("pipeline", "jobs") for p in (ROOT / package).rglob("*.py"))
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CODE_RUNNERS = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "builtins.compile"}
UNSAFE_YAML = {f"yaml.{name}" for name in ("load", "load_all", "full_load", "full_load_all", "unsafe_load",
                                           "unsafe_load_all")}
SHELL_RUNNERS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every import (``import numpy as np`` -> np: numpy)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]  # ``import os.path`` binds ``os``
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str:
    """The called name with import aliases resolved (``np.load`` -> ``numpy.load``); '' if not a name."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _is_literal(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str) -> list[str]:
    """'line N: what' for each unsafe import or call in ``source``."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {m}" for m in modules if m.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _dotted(node.func, aliases), {k.arg: k.value for k in node.keywords}
        where = f"line {node.lineno}: {name or 'call'}"
        if "allow_pickle" in keywords and not _is_literal(keywords["allow_pickle"], False):
            found.append(f"{where} with allow_pickle")
        if name in TORCH_LOADS and not _is_literal(keywords.get("weights_only"), True):
            found.append(f"{where} without weights_only=True")
        if name in CODE_RUNNERS:
            found.append(f"{where} evaluates code")
        if name in UNSAFE_YAML:
            found.append(f"{where} can build Python objects; use yaml.safe_load")
        if name in SHELL_RUNNERS or ("shell" in keywords and not _is_literal(keywords["shell"], False)):
            found.append(f"{where} runs a shell")
        if name.endswith("read_pickle"):
            found.append(f"{where} unpickles")
    return found


def test_the_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"pipeline/config.py", "pipeline/train/common.py", "jobs/label.py"} <= names


def test_our_code_has_no_unpickling_evaluation_or_shell():
    found = [f"{p.relative_to(ROOT)} {v}" for p in SOURCES for v in violations(p.read_text())]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as cp", "from dill import loads", "import joblib", "from _pickle import loads",
    "np.load(f, allow_pickle=True)", "import numpy\nnumpy.load(f, allow_pickle=flag)",
    "import torch\ntorch.load(f)", "import torch as T\nT.load(f, weights_only=False)",
    "from torch import load\nload(f, map_location='cpu')", "eval('1')", "exec(code)", "compile(s, 'f', 'exec')",
    "__import__('os')", "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "from yaml import unsafe_load\nunsafe_load(t)", "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import os\nos.system('ls')", "import pandas as pd\npd.read_pickle(p)",
])
def test_the_checker_catches_each_unsafe_pattern(snippet):
    assert len(violations(snippet)) == 1, violations(snippet)


def test_the_checker_passes_the_safe_forms():
    safe = ("import re, yaml, torch, subprocess\nimport numpy as np\nre.compile('x')\nyaml.safe_load(t)\n"
            "torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\nnp.load(f, allow_pickle=False)\n"
            "subprocess.run(['ls'], shell=False)\nmodel.eval()\n")
    assert violations(safe) == []


@pytest.mark.parametrize("value, becomes", [
    ("__import__('os').system('touch pwned')", "string"),
    ("os.system('touch pwned')", "string"),
    ("!!python/object/apply:os.system ['touch pwned']", "error"),
    ("!!python/name:os.system", "error"),
])
def test_a_set_value_that_looks_like_code_is_never_run(value, becomes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _cli.parser("test").parse_args(["--set", f"run.root={value}"])
    if becomes == "error":
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(args.config, args.overrides)
    else:
        assert load_config(args.config, args.overrides).run.root == os.path.abspath(value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", [
    'run:\n  root: !!python/object/apply:os.system ["touch pwned"]\n',
    "run: !!python/object/new:os.system [touch pwned]\n",
    "!!python/object/apply:os.system\nargs: [touch pwned]\n",
])
def test_a_yaml_file_with_python_tags_is_refused_not_run(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "config.yaml"))
    assert not (tmp_path / "pwned").exists()


class Record:
    """An arbitrary (non-tensor) object, as a careless checkpoint might hold."""

    def __init__(self):
        self.note = "not a tensor"


class Trap:
    """Unpickling this creates ``path``: the code execution a malicious model file would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_our_loader_refuses_model_files_that_hold_objects(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    assert torch.equal(load_exported(str(plain))["weight"], torch.ones(2))
    marker = tmp_path / "code-ran"
    for payload in (Record(), Trap(str(marker))):
        path = tmp_path / f"{type(payload).__name__}.pt"
        torch.save({"weight": torch.ones(2), "extra": payload}, path)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load_exported(str(path))
    assert not marker.exists()


def _captured_init(monkeypatch, **ray_cfg) -> dict:
    """The keyword arguments init_ray passes to ray.init (Ray itself is not started)."""
    import ray

    from pipeline.tasks import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    init_ray(from_dict({"ray": ray_cfg}))
    (kwargs,) = calls
    return kwargs


def test_embedded_ray_starts_no_dashboard_or_job_server(monkeypatch):
    """The HTTP dashboard and job API are off. Ray's own gRPC ports (GCS, raylet, workers) still
    bind every interface and no ray.init option confines them (seen with ``ss -ltnp``; passing
    ``_node_ip_address='127.0.0.1'`` changes nothing) -- README Security says so."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    kwargs = _captured_init(monkeypatch)
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs.get("dashboard_host", "127.0.0.1") == "127.0.0.1"
    assert not any("0.0.0.0" in str(v) for v in kwargs.values())


def test_a_cluster_address_is_joined_without_starting_servers(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    kwargs = _captured_init(monkeypatch)
    # Joining passes only the address and the workers' logging hook (their lines reach our console).
    assert kwargs.pop("address") == "10.0.0.5:6379"
    assert kwargs == {"runtime_env": {"worker_process_setup_hook": kwargs["runtime_env"]["worker_process_setup_hook"]}}
    assert callable(kwargs["runtime_env"]["worker_process_setup_hook"])


def test_cluster_config_and_readme_keep_the_dashboard_private():
    cluster_text = (ROOT / "cluster.yaml").read_text()
    head = " ".join(yaml.safe_load(cluster_text)["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in cluster_text
    readme = (ROOT / "README.md").read_text()
    submits = re.findall(r"ray job submit --address (\S+)", readme)
    assert submits and all(address.startswith("http://127.0.0.1:8265") for address in submits)
    assert "ray dashboard cluster.yaml" in readme  # the SSH tunnel to the head's 8265
    security = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    for words in ("weights_only", "safe_load", "quarantined", "127.0.0.1", "8265", "RAY_AUTH_TOKEN",
                  "storage.py", "tests/test_security.py"):
        assert words in security, words

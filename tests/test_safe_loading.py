"""Safe loading: nothing in ``sa_kit`` unpickles a file.

A cache file, a checkpoint or a Fisher file can come from someone else (a shared drive, a
download, a classmate). Unpickling one runs whatever code it contains, so the package may only
read safetensors, JSON/CSV, ``torch.load(..., weights_only=True)``, ``numpy.load`` without
``allow_pickle=True`` and ``yaml.safe_load``. The scan below parses every ``.py`` under
``sa_kit/`` (AST, with import aliases resolved) and fails on any other loader; the second test
proves that the scanner really catches each pattern.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sa_kit"

# Calls that unpickle (or run arbitrary code) whatever their arguments.
ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler",
    "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads",
    "cloudpickle.load", "cloudpickle.loads",
    "joblib.load",
    "pandas.read_pickle",
    "marshal.load", "marshal.loads",
    "shelve.open",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
BANNED_MODULES = {"dill"}          # dill's whole point is unpickling more than pickle does


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` (through the module's imports), else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _yaml_loader_is_safe(call: ast.Call, aliases: dict[str, str]) -> bool:
    loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
    if loader is None:
        return False
    name = _dotted(loader, aliases) or ""
    return name.rsplit(".", 1)[-1] in SAFE_YAML_LOADERS


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """Every unsafe load in ``source`` as ``"file:line: what"``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    report(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] \
                in BANNED_MODULES:
            report(node, f"from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        if name in ALWAYS_UNSAFE:
            report(node, f"{name}(...) unpickles / runs code from the file")
        elif name in TORCH_LOADS and not _is_true(_kw(node, "weights_only")):
            report(node, f"{name}(...) without weights_only=True")
        elif name == "numpy.load":
            allow = _kw(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                report(node, "numpy.load(..., allow_pickle=...) may unpickle")
        elif name in ("yaml.load", "yaml.load_all") and not _yaml_loader_is_safe(node, aliases):
            report(node, f"{name}(...) without a SafeLoader (use yaml.safe_load)")
        elif name.endswith(".from_pretrained") and isinstance(_kw(node, "use_safetensors"),
                                                              ast.Constant) \
                and _kw(node, "use_safetensors").value is False:
            report(node, f"{name}(..., use_safetensors=False) loads pickled .bin weights")
    return found


def test_the_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, f"expected the sa_kit package under {PACKAGE}"
    found = [hit for f in files
             for hit in unsafe_loads(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not found, "unsafe loads (use safetensors, torch.load(..., weights_only=True), " \
                      "yaml.safe_load):\n" + "\n".join(found)


UNSAFE = [
    "import pickle\npickle.load(open('f', 'rb'))",
    "import pickle as pk\npk.loads(b'')",
    "from pickle import load\nload(f)",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import torch\ntorch.load('w.pt')",
    "import torch\ntorch.load('w.pt', weights_only=False)",
    "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=flag)",
    "from torch import load\nload('w.pt')",
    "import torch as T\nT.serialization.load('w.pt')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('a.npz', allow_pickle=flag)",
    "import dill",
    "from dill import loads",
    "import joblib\njoblib.load('m.joblib')",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, Loader=yaml.UnsafeLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "import pandas as pd\npd.read_pickle('df.pkl')",
    "from transformers import CLIPModel\nCLIPModel.from_pretrained('m', use_safetensors=False)",
]
SAFE = [
    "import torch\ntorch.load('w.pt', weights_only=True)",
    "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('a.npy')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
    "import numpy as np\nnp.loadtxt('a.csv', delimiter=',')",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "from yaml import CSafeLoader, load\nload(text, CSafeLoader)",
    "import json\njson.load(f)",
    "from safetensors.torch import load_file\nload_file('w.safetensors')",
    "from sa_kit.io import load_tensors\nload_tensors('w.safetensors')",
    "import pickle\npickle.dumps(obj)",
    "def load(x):\n    return x\nload(1)",
]


@pytest.mark.parametrize("source", UNSAFE)
def test_the_scanner_catches(source):
    assert unsafe_loads(source), f"not caught:\n{source}"


@pytest.mark.parametrize("source", SAFE)
def test_the_scanner_allows(source):
    assert unsafe_loads(source) == []

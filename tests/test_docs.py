"""What the README and docs promise: their Python examples run, they point nowhere outside the repository,
the layers they show are exported, each mechanism is named in code only in its home, and the recorded
comparisons they cite were made on today's split of the default corpus."""

from __future__ import annotations

import ast
import json
import platform
import re
from pathlib import Path

import pytest
import torch

import mixturelm.layers
from mixturelm.mechanisms import registry

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mixturelm"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_examples_run(capsys):
    """Every ```python block of the README, in order, in one namespace: the examples cannot rot."""
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "max/mean expert load" in printed and "layer1.load_max_over_mean" in printed


def test_docs_point_nowhere_outside_the_repository():
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*/README.md")]
    texts += list(SRC.rglob("*.py"))
    for path in texts:
        text = path.read_text()
        assert "../shared" not in text and not re.search(r"\bissue \d", text), path
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:  # relative links resolve
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / link).exists(), f"{path.name}: {link}"


def test_layers_export_what_the_docs_show():
    shown = set(re.findall(r"mixturelm\.layers\.(\w+)", " ".join(
        p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])))
    shown |= {"MoE", "MoD", "PEER", "SwiGLU"}
    assert shown <= set(mixturelm.layers.__all__), shown - set(mixturelm.layers.__all__)


def _code_names(path: Path) -> set[str]:
    """String constants and names used in a module's code (docstrings and comments aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.rsplit(".", 1)[-1])
    return names


@pytest.mark.parametrize("kind", ["moe", "mod", "peer"])
def test_a_mechanism_is_named_in_code_only_in_its_home(kind):
    """Outside layers/, the benchmarks, the Hugging Face translations and the preset catalogue, a mechanism's kind
    string and classes appear only in its home module: the trainer, FLOP counter, compare, report, views and
    CLI go through the registry. (bench/ sets each mechanism against its peers and hf/ maps each onto other
    libraries' architectures: both are about particular mechanisms by nature; so are parallel/expert.py, which
    shards a MoE layer's experts, and parallel/peer.py, which shards a PEER layer's tables.)"""
    mechanism = registry.get(kind)
    layer = mechanism.module_types[0]
    words = {kind, layer.__name__, mechanism.config_class.__name__, f"{layer.__name__}Aux"}
    # the home, the preset catalogue, and the package that imports the built-in homes (their one registration)
    allowed = {SRC / "mechanisms" / f"{kind}.py", SRC / "presets.py", SRC / "mechanisms" / "__init__.py",
               SRC / "parallel" / "expert.py", SRC / "parallel" / "peer.py"}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        if rel[0] in ("layers", "bench", "hf") or path in allowed:
            continue
        found = words & _code_names(path)
        assert not found, f"{path.relative_to(ROOT)} names {found}"


def recorded_results() -> list[Path]:
    """Every results.json a README or doc cites that trained on a corpus (compare records)."""
    return sorted(p for p in (ROOT / "benchmarks").rglob("results.json")
                  if "corpus" in json.loads(p.read_text()) and "settings" in json.loads(p.read_text()))


@pytest.mark.parametrize("record", recorded_results(), ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_recorded_results_are_on_todays_corpus(record):
    """A recorded comparison on the default corpus is cited as current only while its text is today's split
    (the content fingerprint, or for records made before fingerprints the tokens, bytes and documents of each
    side): one made on another split (other naming or split rules, another Python's library) fails here and
    must be rerun from its command or removed."""
    from mixturelm.data import prepare
    from mixturelm.data.tokens import same_split

    results = json.loads(record.read_text())
    settings = results["settings"]
    if settings.get("data") not in (None, "stdlib") or settings.get("tokenizer", "bytes") != "bytes":
        pytest.skip("trained on a corpus or tokenizer of its own, not the default")
    if results["machine"]["python"] != platform.python_version():
        pytest.skip(f"the default corpus is Python {results['machine']['python']}'s library; this is "
                    f"{platform.python_version()}")
    today = prepare(None, "bytes", settings["val_fraction"], settings["text_field"], log=lambda m: None).stats
    assert same_split(results["corpus"], today), (
        f"{record} was measured on another split of the default corpus: rerun its command or remove it")

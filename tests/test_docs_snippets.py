"""The docs' Python snippets run: every ```python block of README.md, docs/guide.md and
docs/loader.md, in order, each in a fresh interpreter, in a directory holding what the docs
name (``donor1.h5ad``, ``donor2.h5ad`` and ``shards/my_dataset``, built from the embedded
559-cell PBMC sample), so that the docs cannot drift from the code.

A block right after ``<!-- skip-snippet: REASON -->`` is not run (it needs a GPU or a
cluster); such blocks are counted and reported, and must stay few. A block right after
``<!-- check-signature: module.Name -->`` shows a call signature: its parameters, defaults
and keyword-only marker must equal those of ``module.Name``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/guide.md", "docs/loader.md"]
MAX_SKIPPED = 3
_MARK = re.compile(r"<!--\s*(skip-snippet|check-signature):\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Snippet:
    """One ```python block: where it starts, its code, and its marker (if any)."""

    doc: str
    line: int
    code: str
    mark: str | None = None
    arg: str = ""


def snippets(doc: str) -> list[Snippet]:
    """The ```python blocks of ``doc`` in order, with the marker on the line before each."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            m = _MARK.search(lines[i - 1]) if i else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Snippet(doc, i + 1, code, m.group(1) if m else None, m.group(2) if m else ""))
            i = end
        i += 1
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs and dataset the docs name: the demo sample split in two donors with
    ``cell_type``, ``donor_id`` and ``batch`` columns, converted to ``shards/my_dataset``."""
    import anndata as ad
    import pandas as pd

    from scmf_shards.convert import convert_h5ad
    from scmf_shards.demo import demo_h5ad_path

    root = tmp_path_factory.mktemp("docs")
    demo = ad.read_h5ad(demo_h5ad_path())
    rng = np.random.default_rng(0)
    for i, rows in enumerate((slice(0, 280), slice(280, None)), start=1):
        part = demo[rows].copy()
        n = part.n_obs
        part.obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "NK cell", "monocyte"], n)),
                "donor_id": pd.Categorical([f"donor{i}"] * n),
                "batch": pd.Categorical(rng.choice(["b1", "b2"], n)),
            },
            index=part.obs_names,
        )
        part.write_h5ad(root / f"donor{i}.h5ad")
    convert_h5ad([root / "donor1.h5ad", root / "donor2.h5ad"], root / "shards" / "my_dataset",
                 obs_columns=("cell_type", "donor_id", "batch"), quiet=True)
    return root


def _run(snippet: Snippet, cwd: Path) -> None:
    res = subprocess.run([sys.executable, "-c", snippet.code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (
        f"{snippet.doc}:{snippet.line}: the snippet failed (exit {res.returncode})\n"
        f"--- code\n{snippet.code}--- stderr\n{res.stderr[-3000:]}"
    )


def _check_signature(snippet: Snippet) -> None:
    """The block's call, read as a ``def``, has the parameters of the named callable."""
    module, _, name = snippet.arg.rpartition(".")
    target = getattr(importlib.import_module(module), name)
    call = snippet.code.strip()
    assert call.startswith(f"{name}("), f"{snippet.doc}:{snippet.line}: not a call of {name}"
    assert call.endswith(")"), f"{snippet.doc}:{snippet.line}: not a call of {name}"
    namespace: dict[str, object] = {}
    exec(compile(ast.parse(f"def {call}: pass"), snippet.doc, "exec"), namespace)  # noqa: S102 - our own docs
    shown = inspect.signature(namespace[name])  # type: ignore[arg-type]
    real = inspect.signature(target)
    params = [p for p in real.parameters.values() if p.name != "self"]
    got = [(p.name, p.kind, p.default) for p in shown.parameters.values()]
    want = [(p.name, p.kind, p.default) for p in params]
    assert got == want, f"{snippet.doc}:{snippet.line}: the signature shown differs from {snippet.arg}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_python_snippets_run(doc: str, workdir: Path, tmp_path: Path) -> None:
    """Each document's snippets run in order (a later one may use what an earlier one made),
    in a copy of the work directory of its own."""
    cwd = tmp_path / "cwd"
    shutil.copytree(workdir, cwd)
    found = snippets(doc)
    assert found, f"{doc} has no python snippet"
    ran = 0
    for s in found:
        if s.mark == "skip-snippet":
            continue
        if s.mark == "check-signature":
            _check_signature(s)
        else:
            _run(s, cwd)
        ran += 1
    assert ran >= 1


def test_skipped_snippets_are_few_and_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    """Blocks marked skip-snippet are counted and reported; each gives a reason."""
    every = [s for doc in DOCS for s in snippets(doc)]
    skipped = [s for s in every if s.mark == "skip-snippet"]
    for s in skipped:
        assert s.arg, f"{s.doc}:{s.line}: skip-snippet without a reason"
    with capsys.disabled():
        print(f"\ndocs snippets: {len(every)} python blocks, {len(skipped)} not run: "
              + "; ".join(f"{s.doc}:{s.line} ({s.arg})" for s in skipped))
    assert len(skipped) <= MAX_SKIPPED
    assert len(every) >= 8


def test_the_snippet_reader_sees_markers_and_every_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```python\nprint(1)\n```\n<!-- skip-snippet: needs a GPU -->\n```python\nimport cuda\n```\n"
        "```bash\nls\n```\n<!-- check-signature: m.f -->\n```python\nf(a, b=1)\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = snippets("x.md")
    assert [(s.line, s.mark, s.arg, s.code) for s in got] == [
        (2, None, "", "print(1)\n"),
        (6, "skip-snippet", "needs a GPU", "import cuda\n"),
        (13, "check-signature", "m.f", "f(a, b=1)\n"),
    ]


def test_a_drifted_signature_is_caught() -> None:
    good = "CellDataLoader(dataset, batch_size=64"
    doc = next(s for s in snippets("docs/loader.md") if s.mark == "check-signature")
    assert good in doc.code
    _check_signature(doc)
    for bad in (doc.code.replace("batch_size=64", "batch_size=32"), doc.code.replace(", timeout=0", "")):
        with pytest.raises(AssertionError, match="signature shown differs"):
            _check_signature(Snippet(doc.doc, doc.line, bad, doc.mark, doc.arg))

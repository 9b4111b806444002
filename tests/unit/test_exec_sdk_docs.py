"""The SDK's documented examples run as written: every ```python block of docs/sdk.md and
the example in the secvf.sdk module docstring, in order, in one fresh Python process,
against a running sandbox named as the examples name it (the real bridge and the real
agent, tests/unit/running_sandbox.py). The agent runs in a root directory of its own, so
what the examples write to /workspace or /root stays in the test's directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import secvf.sdk
from tests.unit.running_sandbox import WAIT_S, RunningSandbox, mounts_work

ROOT = Path(__file__).resolve().parents[2]
SDK_DOC = ROOT / "docs" / "sdk.md"
VM_NAME = "my-sandbox"  # the name the examples use

#: Files the examples upload, as a user of them would have them.
LOCAL_FILES = {
    "model.py": 'import json\nprint(json.dumps({"answer": 6 * 7}))\n',
    "run.sh": "#!/bin/sh\nmkdir -p out\npython3 /workspace/model.py > out/report.json\n",
    "key": "not really a key\n",
    "a.txt": "a\n",
}

#: Runs the blocks given as JSON on stdin in one namespace, each compiled under its source
#: name, so a traceback names the file and line of the failing example.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    print(f"--- {block['source']}:{block['line']}", flush=True)
    code = "\\n" * (block["line"] - 1) + block["code"]
    exec(compile(code, block["source"], "exec"), namespace)
"""


def markdown_blocks(path: Path) -> list[dict[str, object]]:
    """Every ```python block of ``path``: its code, the file and its first line."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE):
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append({"code": match.group(1), "source": str(path), "line": line})
    return blocks


def docstring_examples(module: ModuleType) -> list[dict[str, object]]:
    """The literal blocks (after a line ending in ``::``) of ``module``'s docstring."""
    blocks = []
    lines = (module.__doc__ or "").splitlines()
    for at, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for following in lines[at + 1:]:
            if following.strip() and not following.startswith("    "):
                break
            body.append(following[4:])
        blocks.append({"code": "\n".join(body).strip("\n") + "\n",
                       "source": f"{module.__name__} docstring", "line": 1})
    return blocks


@pytest.fixture
def my_sandbox(tmp_path: Path) -> Iterator[RunningSandbox]:
    problem = mounts_work()
    if problem is not None:
        pytest.skip(problem)
    with RunningSandbox(tmp_path, VM_NAME, guest_root=True) as running:
        yield running


def test_the_examples_are_found() -> None:
    sources = [b["line"] for b in markdown_blocks(SDK_DOC)]
    assert len(sources) >= 5, sources
    (docstring,) = docstring_examples(secvf.sdk)
    assert 'Sandbox.from_vm("my-sandbox")' in str(docstring["code"])


def test_every_sdk_example_runs_as_written(my_sandbox: RunningSandbox, tmp_path: Path) -> None:
    workdir = tmp_path / "user"
    workdir.mkdir()
    for name, text in LOCAL_FILES.items():
        (workdir / name).write_text(text)
    blocks = [*docstring_examples(secvf.sdk), *markdown_blocks(SDK_DOC)]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), text=True,
                          capture_output=True, cwd=workdir, env=os.environ.copy(),
                          timeout=10 * WAIT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("--- ") == len(blocks)
    guest = my_sandbox.agent.workdir
    assert (guest / "workspace" / "model.py").read_text() == LOCAL_FILES["model.py"]
    assert (guest / "root" / "key").stat().st_uid == 0
    assert json.loads((workdir / "report.json").read_text()) == {"answer": 42}
    assert (guest / "workspace" / "a.txt").exists()

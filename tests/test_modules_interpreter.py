"""Re-run the modules' test files with TRITON_INTERPRET=1, so CPU tensors go through the Triton kernels.

Each file runs in a subprocess: the interpreter flag must be set before triton is imported and must not
leak into the rest of this pytest process. The files keep their shapes small and dtypes fp32/fp16 under
the interpreter (bf16 ``tl.dot`` is wrong there; these kernels use no ``tl.dot``, but the habit holds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from linattn_dsl.modules._triton_utils import triton_available

TESTS = Path(__file__).parent
FILES = ["test_modules_norm.py", "test_modules_conv.py", "test_modules_cross_entropy.py", "test_modules_rotary.py",
         "test_modules_activations.py"]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("test_file", FILES)
def test_file_passes_under_triton_interpreter(test_file):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
         str(TESTS / test_file)],
        check=False, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent,
    )
    assert proc.returncode == 0, f"{test_file} under TRITON_INTERPRET=1:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

"""The one GPU marker (tests/conftest.py): a `gpu` test skips without a GPU, and MINIFD_REQUIRE_GPU=1
turns that skip into a failure, so a GPU run cannot pass by skipping."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minifd.backend import cupy_or_none

MARKED_TEST = "import pytest\n\n\n@pytest.mark.gpu\ndef test_on_the_gpu():\n    pass\n"


@pytest.mark.skipif(cupy_or_none() is not None, reason="this machine has a GPU: the marker runs the test")
@pytest.mark.parametrize("require_gpu, exit_code", [("", 0), ("1", 1)])
def test_a_gpu_test_skips_or_fails_without_a_gpu(tmp_path, require_gpu, exit_code):
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_marked.py").write_text(MARKED_TEST)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                          "--rootdir", str(tmp_path), str(tmp_path / "test_marked.py")],
                         env={**os.environ, "MINIFD_REQUIRE_GPU": require_gpu}, capture_output=True, text=True)
    assert run.returncode == exit_code, run.stdout
    assert ("MINIFD_REQUIRE_GPU=1 but CuPy sees no GPU" in run.stdout) == bool(require_gpu)

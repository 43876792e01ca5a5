"""Run-time compilation of the kernel sources in this directory into CuPy RawModules.

Every `.cu` file here includes `portable.cuh`, so the compiler needs this directory on its include
path. CuPy compiles with NVRTC on CUDA builds and HIPRTC on ROCm builds; both accept `-I` and `-D`,
and CuPy itself adds the target architecture. Modules are cached per (source, options) for the life
of the process; CuPy keeps its own on-disk cache of the compiled binaries keyed by source text.
"""

import functools
import os
from pathlib import Path

from minifd.errors import MinifdError

KERNELS_DIR = Path(__file__).resolve().parent


def _cupy_is_rocm(cupy):
    return bool(getattr(cupy.cuda.runtime, "is_hip", False))


def _cuda_header_dir(cupy):
    """A directory holding cuda_fp16.h, or None. NVRTC has no toolkit headers of its own; CuPy adds
    <its CUDA path>/include, but with a pip-installed NVRTC that path may hold nvrtc.h alone, so
    also look at the toolkit locations and the nvidia-* wheels."""
    candidates = []
    cuda_path = cupy.cuda.get_cuda_path()
    if cuda_path:
        candidates.append(Path(cuda_path) / "include")
    candidates += [Path(os.environ[name]) / "include" for name in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(name)]
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob("*/include"))
    except ImportError:
        pass
    return next((str(path) for path in candidates if (path / "cuda_fp16.h").is_file()), None)


def compiler_options(cupy, options=()):
    """The flags load_module passes: the kernels directory, the caller's options, and on CUDA the
    C++ standard and the toolkit headers (HIPRTC brings its own and rejects unknown flags)."""
    flags = (f"-I{KERNELS_DIR}",) + tuple(options)
    if not _cupy_is_rocm(cupy):
        flags += ("--std=c++17",)
        header_dir = _cuda_header_dir(cupy)
        if header_dir is not None:
            flags += (f"-I{header_dir}",)
    return flags


@functools.lru_cache(maxsize=None)
def load_module(source_name, options=(), kernels_dir=KERNELS_DIR):
    """source_name: a file in kernels_dir (e.g. 'decode_attention.cu'); options: a tuple of extra
    compiler flags (e.g. ('-DHEAD_DIM=128',)) -> compiled cupy.RawModule whose `get_function(name)`
    returns the file's `extern "C"` kernels. Raises FileNotFoundError for an unknown source and
    MinifdError, with the compiler's first error line, for a source that does not compile."""
    import cupy

    source = (Path(kernels_dir) / source_name).read_text()
    module = cupy.RawModule(code=source, options=compiler_options(cupy, options))
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as error:
        log = str(error)
        first_error = next((line.strip() for line in log.splitlines() if "error" in line.lower()), log.strip())
        raise MinifdError(f"kernel {source_name} failed to compile with {' '.join(options) or 'default options'}: "
                          f"{first_error} (--debug shows the whole compiler log)") from error
    return module

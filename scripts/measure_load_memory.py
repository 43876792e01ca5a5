"""Peak host memory while streaming a large checkpoint to the GPU, against the checkpoint's size.

Writes (once) a float16 safetensors checkpoint of the Llama-2-7B shape with --layers layers into
--dir, then loads it onto the GPU in a fresh process and prints that process's peak resident memory
(VmHWM) before and after. The loader memory-maps the file, converts one tensor at a time and
releases its pages once it is on the GPU, so the peak should stay near one tensor, far below the file.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from minifd.bench import LLAMA2_7B
from minifd.model.config import LlamaConfig
from minifd.model.weights import expected_shapes


def write_checkpoint(directory, layers):
    from safetensors.numpy import save_file

    raw = dict(LLAMA2_7B, num_hidden_layers=layers)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    shapes = expected_shapes(LlamaConfig.from_dict(raw))
    shapes["lm_head.weight"] = (raw["vocab_size"], raw["hidden_size"])
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal(1 << 20).astype(np.float16)  # tiled: fast to write, not all zeros
    tensors = {name: np.resize(pattern, shape) for name, shape in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"))


def peak_resident_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def load_and_report(directory):
    import cupy

    from minifd.model.loader import Checkpoint
    from minifd.model.weights import load_weights

    config = LlamaConfig.from_dir(directory)
    cupy.zeros(1)  # the CUDA context's own host memory is not the loader's
    before = peak_resident_mib()
    weights = load_weights(Checkpoint(directory), config, cupy, np.float16, progress=False)
    cupy.cuda.Device().synchronize()
    file_mib = (directory / "model.safetensors").stat().st_size / 2**20
    on_gpu = weights.nbytes_streamed_per_step() / 2**20
    print(f"checkpoint {file_mib:.0f} MiB; on the GPU {on_gpu:.0f} MiB; peak host memory {before:.0f} MiB before "
          f"loading, {peak_resident_mib():.0f} MiB after ({peak_resident_mib() / file_mib:.1%} of the checkpoint)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minifd-7b-shape"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # the measuring child
    args = parser.parse_args()
    if args.load:
        load_and_report(args.dir)
    else:
        if not (args.dir / "model.safetensors").is_file():
            write_checkpoint(args.dir, args.layers)
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--load"], check=True)

"""`minifd check`: run the kernel properties (minifd/properties) on this machine's backend.

For a person with a CUDA wheel on an H100, a ROCm build on an MI210, or no GPU at all: every
property draws hypothesis examples, runs the kernel (or on the CPU its NumPy emulation) and compares
it with a float64 reference within a bound derived from the dtype and the reduction length. The
report names the platform, then one line per property: examples run, the worst relative error and
its bound (of the element closest to its bound), attention rows recomputed, time. A failing
property prints hypothesis's shrunk example, ready to paste into a bug report, and the command
exits 1 once every property has run. --json writes the same report for CI systems.
"""

import json
import sys
from pathlib import Path

import click
import numpy as np

from minifd.backend import array_module, is_gpu
from minifd.errors import MinifdError


def describe_platform(xp):
    """-> dict for the JSON report, with "summary": one line, e.g. 'CuPy 14.0.0, CUDA 13.0 (driver
    13.0), NVIDIA H100 80GB HBM3, warp 32' or 'numpy 2.4.0 CPU (float32)'."""
    import hypothesis

    platform = {"numpy": np.__version__, "hypothesis": hypothesis.__version__}
    if not is_gpu(xp):
        return {**platform, "backend": "cpu", "summary": f"numpy {np.__version__} CPU (float32)"}
    from minifd.kernels.dispatch import gpu_properties

    runtime = xp.cuda.runtime
    rocm = bool(getattr(runtime, "is_hip", False))
    gpu = gpu_properties()
    platform.update(backend="gpu", cupy=xp.__version__, runtime="ROCm" if rocm else "CUDA",
                    runtime_version=_version_text(runtime.runtimeGetVersion(), rocm),
                    driver_version=_version_text(runtime.driverGetVersion(), rocm), gpu=gpu.name,
                    warp_size=gpu.warp_size, multiprocessors=gpu.multiprocessors)
    platform["summary"] = (f"CuPy {xp.__version__}, {platform['runtime']} {platform['runtime_version']} "
                           f"(driver {platform['driver_version']}), {gpu.name}, warp {gpu.warp_size} (float16)")
    return platform


def _version_text(number, rocm):
    """CUDA encodes 13.0 as 13000; HIP encodes 6.4.1 as 60401xxx (major 10^7, minor 10^5)."""
    if rocm:
        return f"{number // 10_000_000}.{number // 100_000 % 100}"
    return f"{number // 1000}.{number % 1000 // 10}"


def selected_properties(properties, backend, only):
    """The registry's properties for this backend, or those named by --only (unknown names are a user error)."""
    applicable = [prop for prop in properties.values() if backend in prop.backends]
    if not only:
        return applicable
    names = [name for text in only for name in text.split(",") if name]
    unknown = [name for name in names if name not in properties]
    if unknown:
        raise MinifdError(f"--only {', '.join(unknown)}: no such property (known: {', '.join(properties)})")
    not_here = [name for name in names if backend not in properties[name].backends]
    if not_here:
        raise MinifdError(f"--only {', '.join(not_here)}: not a property of the {backend} backend")
    return [properties[name] for name in dict.fromkeys(names)]


def result_line(result):
    """One row of the table under HEADER."""
    if result.examples:
        numbers = f"{result.worst_error:>10.3g} {result.bound:>10.3g}"
    else:
        numbers = f"{'-':>10} {'-':>10}"
    return (f"{result.name:<28} {result.examples:>8} {numbers} {result.recomputed:>10} {result.seconds:>8.1f}s  "
            + ("ok" if result.passed else "FAILED"))


HEADER = f"{'property':<28} {'examples':>8} {'rel. error':>10} {'bound':>10} {'recomputed':>10} {'time':>9}"


@click.command("check")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = the GPU when CuPy sees one; cpu checks the NumPy emulations.")
@click.option("--examples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Hypothesis examples per property.")
@click.option("--seed", type=int, default=0, show_default=True, help="Hypothesis seed: same seed, same examples.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run only this property (repeatable, or comma-separated).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON to this file.")
def check_command(device, examples, seed, only, json_path):
    """Property-test minifd's kernels on this machine against float64 references."""
    from minifd.properties import PROPERTIES
    from minifd.properties.runner import run_property

    xp = array_module(device)
    platform = describe_platform(xp)
    chosen = selected_properties(PROPERTIES, platform["backend"], only)
    click.echo(f"minifd check on {platform['summary']}: {examples} examples per property, seed {seed}")
    click.echo(HEADER)
    results = []
    for prop in chosen:
        result = run_property(prop, xp, examples, seed)
        results.append(result)
        click.echo(result_line(result))
        if not result.passed:
            click.echo(result.failure)
    failed = [result.name for result in results if not result.passed]
    summary = f"{len(results) - len(failed)} of {len(results)} properties passed"
    click.echo(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    if json_path is not None:
        report = {"platform": platform, "examples": examples, "seed": seed, "passed": not failed,
                  "properties": [vars(result) for result in results]}
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    if failed:
        sys.exit(1)

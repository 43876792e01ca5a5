#!/usr/bin/env bash
# Compile every minifd/kernels/*.cu standalone for the four targets minifd supports:
#   NVIDIA sm_80 and sm_90 (nvcc), AMD gfx90a (wavefront 64) and gfx1030 (wave 32) (hipcc, HIP_PLATFORM=amd);
#   the sources that read weights through weight_formats.cuh once per weight format.
# Prints one line per (source, target) and exits 1 if any compilation fails or a compiler is missing.
# Usage: scripts/compile_kernels.sh            (NVCC=..., HIPCC=... override the compilers)
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kernels_dir="$repo_root/minifd/kernels"
nvcc="${NVCC:-nvcc}"
hipcc="${HIPCC:-hipcc}"
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT

failures=0
compile() {  # compile LABEL SOURCE COMMAND...
    local label="$1" source="$2"
    shift 2
    local log="$build_dir/$(basename "$source" .cu).$label.log"
    if "$@" >"$log" 2>&1; then
        echo "ok    $label  $(basename "$source")"
    else
        echo "FAIL  $label  $(basename "$source")"
        sed 's/^/      /' "$log"
        failures=$((failures + 1))
    fi
}

for tool in "$nvcc" "$hipcc"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "FAIL  compiler not found: $tool"
        failures=$((failures + 1))
    fi
done

shopt -s nullglob
sources=("$kernels_dir"/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "FAIL  no .cu sources in $kernels_dir"
    exit 1
fi

for source in "${sources[@]}"; do
    name="$(basename "$source" .cu)"
    # The product kernels are compiled once per weight format (weight_formats.cuh), every other source once.
    variants=("")
    if grep -q '#include "weight_formats.cuh"' "$source"; then
        variants=(WEIGHT_FP16 WEIGHT_INT8 WEIGHT_INT4)
    fi
    for variant in "${variants[@]}"; do
        define=() suffix=""
        if [ -n "$variant" ]; then
            define=("-DWEIGHT_FORMAT=$variant") suffix=".$variant"
        fi
        for arch in sm_80 sm_90; do
            compile "$arch$suffix" "$source" "$nvcc" -c -arch="$arch" "${define[@]}" -I "$kernels_dir" "$source" \
                -o "$build_dir/$name$suffix.$arch.o"
        done
        for arch in gfx90a gfx1030; do
            compile "$arch$suffix" "$source" env HIP_PLATFORM=amd "$hipcc" -c --offload-arch="$arch" "${define[@]}" \
                -I "$kernels_dir" "$source" -o "$build_dir/$name$suffix.$arch.o"
        done
    done
done

if [ "$failures" -ne 0 ]; then
    echo "$failures compilation(s) failed"
    exit 1
fi
echo "all ${#sources[@]} kernel sources compile for sm_80, sm_90, gfx90a, gfx1030"

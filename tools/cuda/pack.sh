#!/usr/bin/env bash
# tools/cuda/pack.sh — prepares, on the development machine, what tools/cuda/device_check.sh
# runs on a GPU machine whose image has nvcc and PyTorch but not this project's Debian
# libraries (OpenBLAS, jansson, libpng, ...): builds with make (nvcc present: the CUDA
# backend included) and packs the CUDA test programs, dg-bench and mkmodel with the shared
# libraries they need (not glibc, libstdc++ or the CUDA libraries, which the GPU machine
# has in versions at least as new) into .devcarry/bundle.tar.xz, and writes the seeded full
# package (weights filled from the seed at load) to .devcarry/full-seeded. .devcarry/ is ignored by git (.git/info/exclude); name it in the
# device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
make -j"$(nproc)" build/tests/test_backend_cuda build/tests/test_cuda_parity build/tests/test_interleaved build/tests/test_sched_threads build/tests/test_batching build/dg-bench build/mkmodel \
    build/libduogen_cuda.so
rm -rf .devcarry && mkdir -p .devcarry/stage/bin .devcarry/stage/lib
bins="build/tests/test_backend_cuda build/tests/test_cuda_parity build/tests/test_interleaved build/tests/test_sched_threads build/tests/test_batching build/dg-bench build/mkmodel build/libduogen_cuda.so"
for b in $bins; do strip --strip-debug -o ".devcarry/stage/bin/$(basename "$b")" "$b"; done
ldd $bins | awk '$3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libstdc++*|libgcc_s*|libcuda*|libcublas*|libcudart*) ;;
        *) cp -L "$lib" .devcarry/stage/lib/ ;;
    esac
done
tar -C .devcarry/stage -cJf .devcarry/bundle.tar.xz bin lib
rm -rf .devcarry/stage
# the full package as headers only (mkmodel --seeded, ~5 MB with the Qwen2 vocabulary):
# dg-bench job fills its 20 GB of weights from the seed. The vocabulary itself travels with
# the working tree (tools/mkmodel/vocab/qwen2).
build/mkmodel --preset full --seed 1 --seeded --out .devcarry/full-seeded
ls -l .devcarry/bundle.tar.xz; du -sh .devcarry/full-seeded

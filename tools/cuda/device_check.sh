#!/usr/bin/env bash
# tools/cuda/device_check.sh — the one prepared run on a GPU machine (issue 9):
#   1. the device, driver and nvcc;
#   2. nvcc build check of kernels/cuda/*.cu for sm_90 (ptxas register/spill report kept);
#   3. the programs: a full `make` where this machine has the project's build dependencies,
#      else the ones tools/cuda/pack.sh packed (.devcarry/bundle.tar.xz, carried);
#   4. build/tests/test_backend_cuda (every op vs the CPU backend, stated tolerances);
#   5. build/tests/test_cuda_parity (greedy tokens on the tiny and small packages, in the
#      default, precise, graphs and unverified modes, and of four sequences stepped together;
#      the DiT alone and batched), and the CUDA cases of test_interleaved
#      and test_sched_threads (one model, two schedulers on two threads), with the default
#      (verified) kernels and again with DG_CUDA_UNVERIFIED=1, and of test_batching (eight
#      jobs stepped together; both ways too);
#   6. dg-bench cuda (7B decoder shapes, seeded weights: prefill, decode, bandwidth limit)
#      and dg-bench job (the seeded full package: DiT s/image at 1024² x 35 steps with CFG,
#      VAE decode ms, one 4-image interleaved job);
#   7. tools/reference/bench_torch_cuda.py (transformers bf16 on the same GPU), and ratios;
#   8. tools/reference/bench_torch_image.py (diffusers bf16: the 2B DiT step, 35-step loop with
#      guidance, VAE at 1024^2) on $DG_FULL_PKG, with the wheels carried in .whl/;
#   9. compute-sanitizer racecheck over the attention cases (shared-memory races).
# Logs and JSON go to $OUT (default build/device-out): at most 8 files (the tool's limit):
# device_check.log (everything printed), ptxas.txt, bench_cuda.json, bench_job.json,
# torch_cuda.json, torch_image.json, summary.json.
#
#   bash tools/cuda/pack.sh                      # here, once, before the device call
#   bash tools/cuda/wheels.sh                    # here, once: diffusers into .whl/
#   bash tools/cuda/device_check.sh              # there (carry: .devcarry, .whl)
# One call of 10 minutes does not hold everything (the image benchmarks alone take ~5):
# STEPS picks the groups, e.g. STEPS="tests text" in one call and STEPS="image race" in the
# next (default: all). Groups: tests (3-5), text (6: dg-bench cuda, 7), image (6: dg-bench
# job, 8), race (9); 1, 2 and the summary always run.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/device-out}
mkdir -p "$OUT" build
exec > >(tee -a "$OUT/device_check.log") 2>&1
step() { echo; echo "==== $* ($(date +%T))"; }
QUICK=${QUICK:-}
STEPS=${STEPS:-tests text image race}
want() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

step device
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
nvcc --version | tail -1
uname -m; nproc

step "nvcc build check: kernels/cuda/*.cu for sm_90"
mkdir -p build/nvcc-check
pids=()
for f in kernels/cuda/*.cu; do
    n=$(basename "$f" .cu)
    # the Makefile's flags (its ABI hash too: cuda_backend.cu refuses to build without one)
    ( nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -Iengine -Ikernels --Werror all-warnings \
          -Xcompiler -fPIC,-Wall,-Wextra,-Wno-unused-parameter -DDG_BACKEND_ABI='"check"' \
          -Xptxas -v -c "$f" -o "build/nvcc-check/$n.o" > "build/nvcc-check/$n.log" 2>&1 \
      && echo "ok   $f" || { echo "FAIL $f"; cat "build/nvcc-check/$n.log"; } ) &
    pids+=($!)
done
wait "${pids[@]}"   # (a bare wait would also wait for the tee above)
grep -h -B1 -A1 "registers\|spill" build/nvcc-check/*.log | grep -v "^--" > "$OUT/ptxas.txt"
grep -h "spill" build/nvcc-check/*.log | sort | uniq -c

step programs
if [ -z "${DG_USE_BUNDLE:-}" ] && pkg-config --exists jansson libpng libturbojpeg libutf8proc libpcre2-8 hiredis libprotobuf-c 2>/dev/null &&
   [ -f /usr/include/x86_64-linux-gnu/openblas-openmp/cblas.h ]; then
    echo "building here"
    make -j"$(nproc)" build/tests/test_backend_cuda build/tests/test_cuda_parity build/tests/test_interleaved build/tests/test_sched_threads build/tests/test_batching build/dg-bench build/mkmodel \
        build/libduogen_cuda.so 2>&1 | tail -3
else
    echo "no build dependencies here: the packed programs (tools/cuda/pack.sh)"
    rm -rf build/carry && mkdir -p build/carry build/tests
    tar -C build/carry -xJf .devcarry/bundle.tar.xz || { echo "no .devcarry/bundle.tar.xz"; exit 1; }
    cp build/carry/bin/test_backend_cuda build/carry/bin/test_cuda_parity build/carry/bin/test_interleaved \
       build/carry/bin/test_sched_threads build/carry/bin/test_batching build/tests/
    cp build/carry/bin/dg-bench build/carry/bin/mkmodel build/carry/bin/libduogen_cuda.so build/
    export LD_LIBRARY_PATH="$PWD/build/carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ldd build/libduogen_cuda.so | grep -q "libcublas.*not found"; then   # the toolkit's or PyTorch's
    d=$(dirname "$(find / \( -path /proc -o -path /sys \) -prune -o -name 'libcublasLt.so.13*' -print 2>/dev/null | head -1)")
    echo "cuBLAS from $d"
    export LD_LIBRARY_PATH="$d:$(dirname "$(find / \( -path /proc -o -path /sys \) -prune -o -name 'libcudart.so.13*' -print 2>/dev/null | head -1)"):${LD_LIBRARY_PATH:-}"
fi
ldd build/dg-bench build/libduogen_cuda.so | grep "not found" && echo "MISSING LIBRARIES"

if want tests; then
    step "op-by-op test (test_backend_cuda)"
    timeout 120 build/tests/test_backend_cuda 2>&1
    step "model parity (test_cuda_parity), the interleaved loop (test_interleaved's cuda case), two schedulers on two threads (test_sched_threads' cuda case)"
    timeout 180 build/tests/test_cuda_parity 2>&1
    DG_TEST=interleaved_on_cuda timeout 60 build/tests/test_interleaved 2>&1
    DG_TEST=two_schedulers_on_two_threads_answer_as_one_on_cuda timeout 60 build/tests/test_sched_threads 2>&1
    DG_TEST=batching_on_cuda timeout 90 build/tests/test_batching 2>&1
    step "the same three with the kernels not yet verified on a device (DG_CUDA_UNVERIFIED=1)"
    DG_CUDA_UNVERIFIED=1 DG_TEST=interleaved_on_cuda timeout 60 build/tests/test_interleaved 2>&1
    DG_CUDA_UNVERIFIED=1 DG_TEST=two_schedulers_on_two_threads_answer_as_one_on_cuda timeout 60 build/tests/test_sched_threads 2>&1
    DG_CUDA_UNVERIFIED=1 DG_TEST=batching_on_cuda timeout 90 build/tests/test_batching 2>&1
fi

if want text; then
    step "dg-bench cuda"
    # with every kernel, so that the figures show what the unverified ones would give
    DG_CUDA_UNVERIFIED=1 timeout 75 build/dg-bench ${QUICK:+--quick} --json "$OUT/bench_cuda.json" cuda
fi

export DG_FULL_PKG=${DG_FULL_PKG:-.devcarry/full-seeded}
if want image; then
    step "dg-bench job: DiT s/image, VAE decode ms, a 4-image interleaved job (seeded full package)"
    if [ -f "$DG_FULL_PKG/duogen.json" ]; then
        DG_CUDA_UNVERIFIED=1 DG_SEEDED_WEIGHTS=1 timeout 240 build/dg-bench ${QUICK:+--quick} --model "$DG_FULL_PKG" --json "$OUT/bench_job.json" job
    else
        echo "no $DG_FULL_PKG/duogen.json (tools/cuda/pack.sh writes it): skipped"; unset DG_FULL_PKG
    fi
fi

if want text; then
    step "transformers baseline (bench_torch_cuda.py)"
    PYTHONUNBUFFERED=1 timeout 100 python3 tools/reference/bench_torch_cuda.py ${QUICK:+--quick} --out "$OUT/torch_cuda.json"
fi

want image && step "diffusers baseline (bench_torch_image.py)"
if ! want image; then
    :
elif [ -z "${DG_FULL_PKG:-}" ]; then
    echo "DG_FULL_PKG is not set (no full package was made): skipped"
else
    if ls .whl/*.whl > /dev/null 2>&1; then   # this machine has no diffusers and no package index
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # about 30 s on an H100: the model built on the device, the VAE at 1024^2, two 35-step loops
    PYTHONUNBUFFERED=1 timeout 150 python3 tools/reference/bench_torch_image.py ${QUICK:+--quick} \
        --model "$DG_FULL_PKG" --out "$OUT/torch_image.json"
fi

step summary
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(out, n)))
    except Exception:
        return {}
ours, torch, torch_image = load("bench_cuda.json").get("cuda", {}), load("torch_cuda.json"), load("torch_image.json")
job = load("bench_job.json").get("job", {})
s = {"device": torch.get("device") or torch_image.get("device"), "ours": ours, "job": job, "torch": torch,
     "torch_image": torch_image, "ratios": {}}
# the image side: same keys in dg-bench job and bench_torch_image.py (ours / torch: below 1 is faster)
for k in sorted(job):
    if (k.startswith("dit_s_per_image_") or k.startswith("vae_decode_ms_")) \
            and isinstance(torch_image.get(k), (int, float)) and torch_image[k] > 0:
        s["ratios"][k + "_ours_over_torch"] = job[k] / torch_image[k]
if job.get("dit_tflops") and torch.get("bf16_matmul_tflops"):
    s["ratios"]["dit_tflops_vs_torch_matmul"] = job["dit_tflops"] / torch["bf16_matmul_tflops"]
for k in ("decode_tok_s", "prefill_512_tok_s", "prefill_2048_tok_s", "prefill_64_tok_s", "prefill_128_tok_s"):
    if ours.get(k) and torch.get(k):
        s["ratios"][k] = ours[k] / torch[k]
if ours.get("decode_graphs_tok_s") and ours.get("decode_tok_s"):
    s["ratios"]["decode_graphs_over_plain"] = ours["decode_graphs_tok_s"] / ours["decode_tok_s"]
if ours.get("decode_bytes_per_step_gb") and torch.get("copy_gb_s"):
    lim = torch["copy_gb_s"] / ours["decode_bytes_per_step_gb"]
    s["ratios"]["decode_vs_torch_copy_limit"] = ours.get("decode_tok_s", 0) / lim
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2, sort_keys=True)
print(json.dumps(s["ratios"], indent=1))
for k in sorted(ours): print(f"ours  {k}: {ours[k]:.4g}")
for k in sorted(job): print(f"job   {k}: {job[k]:.4g}")
for k in sorted(torch): print(f"torch {k}: {torch[k]:.4g}" if isinstance(torch[k], float) else f"torch {k}: {torch[k]}")
for k in sorted(torch_image):
    v = torch_image[k]
    print(f"torch_image {k}: {v:.4g}" if isinstance(v, float) else f"torch_image {k}: {v}")
PY

want race || exit 0
step "racecheck: the attention and top-k kernels (compute-sanitizer)"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
echo "compute-sanitizer: ${CS:-not found}"
# the kernels with shared-memory handoffs (cuda_attention_batch: decode_partial's merge of the
# warps; cuda_kv_bf16: the wmma tiles' scalar path for bf16 rows)
for t in cuda_attention_segments cuda_topk cuda_attention_batch cuda_kv_bf16; do
    [ -n "$CS" ] && DG_TEST=$t timeout 90 "$CS" --tool racecheck build/tests/test_backend_cuda 2>&1 | tail -8
done

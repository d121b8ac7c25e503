/* Whether this machine can run the CUDA cases. A case that needs a GPU starts with
 *
 *     if (!test_cuda_present()) SKIP("%s", test_cuda_absent_reason());
 *
 * Skipped only where there is nothing to test: a build without nvcc, or a machine without
 * a CUDA device. Any other failure to open "cuda:0" on a machine that has one (the module
 * missing from the build, memory, a driver error) is a failure of the case, not a skip. */
#ifndef DG_TEST_DEVICE_H
#define DG_TEST_DEVICE_H

/* 1 when "cuda:0" opens (tried once per process, with DG_GPU_MEMORY defaulting to 8G so
 * that test programs leave room for each other); 0 when there is no GPU to test; 0 after a
 * test_fail() naming the error otherwise. */
int         test_cuda_present(void);
const char *test_cuda_absent_reason(void);   /* why test_cuda_present() said 0 */

/* 1 when the "cpu" backend uses AVX-512 BF16 kernels here (VDPBF16PS: the bf16 compute
 * order's and the bf16 attention's), as it decides from CPUID; 0 otherwise. A case of
 * those kernels only skips where it is 0:
 *
 *     if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
 */
int         test_cpu_avx512_bf16(void);
/* 1 when the "cpu" backend uses AVX-512 F kernels here (without bf16 compute: the fp32
 * segment attention's own products, kernels/cpu/attention_f32.h). */
int         test_cpu_avx512(void);
#define TEST_NO_AVX512 "this CPU has no AVX-512 F: the kernels run nowhere here"

#define TEST_NO_AVX512_BF16 \
    "this CPU has no AVX-512 BF16 (CPUID.(EAX=7,ECX=1):EAX bit 5 with AVX-512 F and BW): its kernels run nowhere here"

#endif

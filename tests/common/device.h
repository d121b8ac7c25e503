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

#endif

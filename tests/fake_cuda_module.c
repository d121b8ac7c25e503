/* A CUDA backend module of another build (the Makefile gives it another DG_BACKEND_ABI):
 * test_backend_cpu checks that the core refuses it without calling into it. */
#include <stddef.h>
#include <stdio.h>

typedef struct dg_backend dg_backend;

const char dg_cuda_abi[] = DG_BACKEND_ABI;

int dg_cuda_backend_new(int device, size_t budget, dg_backend **out, char *err, size_t errlen);
int dg_cuda_backend_new(int device, size_t budget, dg_backend **out, char *err, size_t errlen) {
    (void)device;
    (void)budget;
    *out = NULL;
    snprintf(err, errlen, "the fake module was called");
    return -1;
}

/* diffusers.c — the diffusers file name for a component's single weight file. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "mkmodel.h"

int mk_write_diffusers(const char *dir, const mk_list *l, uint64_t seed, char *err, size_t errlen) {
    char from[4096], to[4096];
    /* one file whatever its size: diffusers reads an unsharded file of any size */
    if (st_write(dir, l, seed, (size_t)1 << 40, err, errlen) < 0) return -1;
    snprintf(from, sizeof from, "%s/model.safetensors", dir);
    snprintf(to, sizeof to, "%s/diffusion_pytorch_model.safetensors", dir);
    if (rename(from, to) < 0) {
        snprintf(err, errlen, "%s: %s", to, strerror(errno));
        return -1;
    }
    return 0;
}

/* Drawn images as files (Job.image_output, the worker's output_root): each image is
 * <root>/<job id>/<n>.png, written to a temporary name, fsynced, and renamed over its final
 * name, so that a reader sees the whole file or none, and an attempt that runs again writes
 * the same names over the first's. The files are never expired: the producer removes them. */
#ifndef DG_OUTDIR_H
#define DG_OUTDIR_H

#include <stddef.h>
#include <stdint.h>

/* Writes image n of job `id` under root; on success its path is in path. Returns 0, or -1
 * with err naming the path and the system's reason (the disk full, the root missing). */
int  dg_outdir_write(const char *root, const char *id, int n, const uint8_t *png, size_t len, char *path,
                     size_t pathlen, char *err, size_t errlen);

/* Removes the images numbered over n_kept that an earlier attempt of job `id` left (one that
 * drew more before it was cut), and the temporary files of attempts that died while
 * writing: what a result names is all there is. */
void dg_outdir_prune(const char *root, const char *id, int n_kept);

/* A job id that names a directory: not "." or ".." (the ids' alphabet has no '/'). */
int  dg_outdir_id_ok(const char *id);

#endif

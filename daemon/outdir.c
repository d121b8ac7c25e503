/* outdir.c — drawn images written as files, atomically (outdir.h). */
#include "outdir.h"
#include "job.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int dg_outdir_id_ok(const char *id) { return strcmp(id, ".") && strcmp(id, ".."); }

static int write_all(int fd, const uint8_t *p, size_t len) {
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* fsync of a directory, so that a rename in it survives a crash */
static void sync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* "output_root: <what> "<path>": <errno's text>", the path clipped (dg_clip) so that the
 * reason stays; -1. Reads errno first. */
static int fail_at(char *err, size_t errlen, const char *what, const char *path) {
    const int e = errno;
    char q[300];
    snprintf(err, errlen, "output_root: %s \"%s\": %s", what, dg_clip(path, q, sizeof q), strerror(e));
    return -1;
}

int dg_outdir_write(const char *root, const char *id, int n, const uint8_t *png, size_t len, char *path,
                    size_t pathlen, char *err, size_t errlen) {
    char dir[4096], tmp[4200];
    if (!dg_outdir_id_ok(id)) {
        snprintf(err, errlen, "output_root: job id \"%s\" cannot name a directory", id);
        return -1;
    }
    snprintf(dir, sizeof dir, "%s/%s", root, id);
    snprintf(path, pathlen, "%s/%d.png", dir, n);
    /* the host's name beside the pid: workers of several hosts (or containers with equal
     * pids) share the mount */
    char host[64] = "";
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "host");
    snprintf(tmp, sizeof tmp, "%s/.%d.png.%s.%ld.tmp", dir, n, host, (long)getpid());
    /* <id>/'s own entry in output_root is synced too, or a crash could lose the directory
     * with its files: when made, and at an attempt's first image (an earlier attempt may have
     * made it and died before its sync) */
    if (mkdir(dir, 0755) == 0 || (errno == EEXIST && n == 1)) {
        sync_dir(root);
    } else if (errno != EEXIST) {
        return fail_at(err, errlen, "cannot make", dir);
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return fail_at(err, errlen, "cannot write", tmp);
    if (write_all(fd, png, len) || fsync(fd)) {
        fail_at(err, errlen, "writing", tmp);
        close(fd);
        unlink(tmp);
        return -1;
    }
    close(fd);
    if (rename(tmp, path)) {
        fail_at(err, errlen, "cannot move the written file into", path);
        unlink(tmp);
        return -1;
    }
    sync_dir(dir);
    return 0;
}

/* "<n>.png" with n > n_kept, or ".<anything>.tmp" */
static int stale(const char *name, int n_kept) {
    size_t len = strlen(name);
    if (name[0] == '.') return len > 4 && !strcmp(name + len - 4, ".tmp");
    char *end;
    long n = strtol(name, &end, 10);
    return end != name && !strcmp(end, ".png") && n > n_kept;
}

void dg_outdir_prune(const char *root, const char *id, int n_kept) {
    char dir[4096], path[4400];
    if (!dg_outdir_id_ok(id)) return;
    snprintf(dir, sizeof dir, "%s/%s", root, id);
    DIR *d = opendir(dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d));) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && stale(e->d_name, n_kept)) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    }
    closedir(d);
}

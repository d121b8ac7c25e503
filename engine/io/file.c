/* file.c — opening a model's files for reading (see file.h). */
#include "io/file.h"

#include "duogen.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int dg_open_regular(const char *path, char *why, size_t n) {
    /* O_NONBLOCK: opening a FIFO for reading waits for a writer without it */
    const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        snprintf(why, n, "%s", strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        snprintf(why, n, "%s", strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        snprintf(why, n, "not a regular file (%s)", S_ISDIR(sb.st_mode) ? "a directory" : S_ISFIFO(sb.st_mode) ? "a FIFO"
                                                     : S_ISSOCK(sb.st_mode) ? "a socket" : "a device");
        close(fd);
        return -1;
    }
    const int fl = fcntl(fd, F_GETFL);   /* reads of a regular file block as they always do */
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

int dg_fopen_regular(const char *path, FILE **f, char *why, size_t n) {
    const int fd = dg_open_regular(path, why, n);
    if (fd < 0) return DG_EMODEL;
    if (!(*f = fdopen(fd, "rb"))) {
        snprintf(why, n, "%s", strerror(errno));
        close(fd);
        return DG_ENOMEM;
    }
    return 0;
}

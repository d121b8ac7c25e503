/* out.h — duogenctl's standard output.
 *
 * duogenctl ignores SIGPIPE: a Redis server that closes the connection (at its maxclients,
 * say) gives an error naming what it said, not a silent death by the signal. A reader of
 * standard output that left (`duogenctl watch | head -1`) still ends duogenctl by SIGPIPE,
 * as it ends any writer: at the next flush, which every loop that writes makes. */
#ifndef DG_CTL_OUT_H
#define DG_CTL_OUT_H

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline void dg_ctl_flush(void) {
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return;
    if (errno == EPIPE) {
        signal(SIGPIPE, SIG_DFL);
        raise(SIGPIPE);
    }
    fprintf(stderr, "duogenctl: standard output: %s\n", errno ? strerror(errno) : "write error");
    exit(3);
}

#endif

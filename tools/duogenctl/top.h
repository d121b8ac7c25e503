/* top.h — duogenctl top: a live terminal view of one fleet (the workers of one key prefix).
 *
 * Each frame reads, over one connection: the queue streams (length; each group's pending
 * entries and lag), the done stream's entries of the last minute (the rates, by status), the
 * dead-letter count, and every live worker's heartbeat hash with, for each job it runs, the
 * job hash's phase, progress, tokens, images and step. Nothing is written.
 *
 * Live mode draws on the terminal's alternate screen every interval and quits on q (or
 * Ctrl-C), restoring the terminal; a Redis that is away shows as a line in the frame and the
 * view goes on. Once mode prints one frame as plain lines (no escapes) and returns; into a
 * file or a pipe, without once, such a frame and a blank line every interval until Ctrl-C. */
#ifndef DG_CTL_TOP_H
#define DG_CTL_TOP_H

#include "../../daemon/redis.h"

/* Returns 0 after q, Ctrl-C or one frame (once); 3 when once mode could not read Redis or
 * was refused a command (the frame names it; a producer's ACL user cannot read what top
 * reads). Frames that cannot be written end duogenctl (out.h: a full disk exits 3, naming
 * it; a pipe whose reader left, SIGPIPE). */
int dg_top_run(dg_redis *r, const char *prefix, const char *where, int interval_ms, int once);

#endif

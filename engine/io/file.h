/* file.h — opening a model's files for reading.
 *
 * A model package's files are regular files: a FIFO in place of one blocked the start for
 * ever (open and read wait for a writer), a directory said "mmap: No such device" or "not
 * valid JSON: line 1 column 0", an unreadable file "no model.safetensors". */
#ifndef DG_FILE_H
#define DG_FILE_H

#include <stddef.h>
#include <stdio.h>

/* Opens path read-only (close-on-exec), without waiting on a FIFO. Returns the descriptor,
 * or -1 with why: the system's reason ("Permission denied", "Too many levels of symbolic
 * links"), or "not a regular file (a directory)", "(a FIFO)", "(a device)", "(a socket)". */
int dg_open_regular(const char *path, char *why, size_t n);
/* The same as a stdio stream ("rb"): 0 with *f set; DG_EMODEL with why (dg_open_regular's
 * reasons), or DG_ENOMEM when the stream could not be made. */
int dg_fopen_regular(const char *path, FILE **f, char *why, size_t n);

#endif

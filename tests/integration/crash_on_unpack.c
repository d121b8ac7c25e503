/* LD_PRELOAD shim for test_queue_faults.py: protobuf_c_message_unpack() aborts the process
 * when the bytes to unpack hold the marker below, standing in for a job that kills the
 * worker while it is read (a parser bug). Everything else unpacks as usual. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MARKER "CRASH-ON-UNPACK"

typedef void *(*unpack_fn)(const void *desc, void *allocator, size_t len, const uint8_t *data);

void *protobuf_c_message_unpack(const void *desc, void *allocator, size_t len, const uint8_t *data) {
    static unpack_fn real;
    if (!real) real = (unpack_fn)dlsym(RTLD_NEXT, "protobuf_c_message_unpack");
    if (data && memmem(data, len, MARKER, sizeof MARKER - 1)) abort();
    return real(desc, allocator, len, data);
}

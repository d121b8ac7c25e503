/* queue-baseline — the plainest hiredis consumer, for `make bench-queue` to compare duogend
 * with: XREADGROUP BLOCK COUNT 1, then XADD <done> + XACK in one pipeline (the done entry
 * is what makes a finished job observable to the producer, as duogend's is).
 *
 *   queue-baseline HOST PORT STREAM GROUP CONSUMER DONE_STREAM
 * Runs until SIGTERM. */
#include <hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: queue-baseline HOST PORT STREAM GROUP CONSUMER DONE_STREAM\n");
        return 2;
    }
    const char *stream = argv[3], *group = argv[4], *me = argv[5], *done = argv[6];
    signal(SIGTERM, on_term);
    redisContext *c = redisConnect(argv[1], atoi(argv[2]));
    if (!c || c->err) {
        fprintf(stderr, "queue-baseline: cannot connect\n");
        return 1;
    }
    redisReply *r = redisCommand(c, "XGROUP CREATE %s %s 0 MKSTREAM", stream, group);
    if (r) freeReplyObject(r);
    while (!stop) {
        r = redisCommand(c, "XREADGROUP GROUP %s %s COUNT 1 BLOCK 200 STREAMS %s >", group, me, stream);
        if (!r) return 1;
        if (r->type == REDIS_REPLY_ARRAY) {
            const redisReply *entries = r->element[0]->element[1];
            for (size_t i = 0; i < entries->elements; i++) {
                const redisReply *e = entries->element[i], *f = e->element[1];
                const char *id = "";
                for (size_t k = 0; k + 1 < f->elements; k += 2)
                    if (!strcmp(f->element[k]->str, "id")) id = f->element[k + 1]->str;
                redisAppendCommand(c, "XADD %s * id %s status done", done, id);
                redisAppendCommand(c, "XACK %s %s %s", stream, group, e->element[0]->str);
                for (int k = 0; k < 2; k++) {
                    void *rep;
                    if (redisGetReply(c, &rep) != REDIS_OK) return 1;
                    freeReplyObject(rep);
                }
            }
        }
        freeReplyObject(r);
    }
    redisFree(c);
    return 0;
}

/* The take policy (daemon/take.h): which commands a worker sends to get stream entries,
 * decided from plain facts with no Redis, and the XREADGROUP a read step becomes. */
#include <stdio.h>
#include <string.h>

#include "../daemon/take.h"
#include "common/harness.h"

/* A healthy worker with two free slots, holding nothing: it reads new entries. */
static dg_take_facts facts(void) {
    return (dg_take_facts){.connected = 1, .groups_ok = 1, .room = 2, .block_ms = 2000,
                           .high = "duogen:jobs:high", .normal = "duogen:jobs"};
}

static void check_step(const dg_take_step *s, dg_take_source source, const char *stream0,
                       const char *stream1, int count) {
    CHECK_EQ_INT(s->source, source);
    CHECK_EQ_INT(s->n_streams, stream1 ? 2 : 1);
    CHECK_EQ_STR(s->streams[0], stream0);
    if (stream1) CHECK_EQ_STR(s->streams[1], stream1);
    CHECK_EQ_INT(s->count, count);
}

TEST(take_nothing_while_disconnected) {
    dg_take_facts f = facts();
    f.connected = 0;
    f.groups_ok = 0;
    f.own_pending = 1;
    f.reaper_due = 1;
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
}

TEST(take_nothing_without_room_or_while_draining) {
    dg_take_facts f = facts();
    f.room = 0;
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
    f.room = -3;   /* one read's worth over max_inflight */
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
    f = facts();
    f.draining = 1;
    f.own_pending = 1;
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
}

TEST(take_reads_both_streams_high_first_in_one_command) {
    dg_take_facts f = facts();
    f.room = 3;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 1);
    check_step(&p.steps[0], DG_TAKE_READ, "duogen:jobs:high", "duogen:jobs", 3);
    CHECK_EQ_INT(p.steps[0].block_ms, 2000);   /* idle: the read waits */
    f.held = 1;
    p = dg_take_decide(&f);
    CHECK_EQ_INT(p.steps[0].block_ms, 0);      /* the engine has work: never wait */
}

TEST(take_own_pending_entries_first) {
    dg_take_facts f = facts();
    f.own_pending = 1;
    f.reaper_due = 1;   /* own entries go before the reaper */
    f.held = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 2);
    check_step(&p.steps[0], DG_TAKE_OWN, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[1], DG_TAKE_OWN, "duogen:jobs", NULL, 2);
}

TEST(take_reaps_when_due) {
    dg_take_facts f = facts();
    f.reaper_due = 1;
    f.room = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 2);
    check_step(&p.steps[0], DG_TAKE_REAP, "duogen:jobs:high", NULL, 1);
    check_step(&p.steps[1], DG_TAKE_REAP, "duogen:jobs", NULL, 1);
}

TEST(take_makes_groups_then_drains_own_entries) {
    dg_take_facts f = facts();
    f.groups_ok = 0;
    f.reaper_due = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 3);
    check_step(&p.steps[0], DG_TAKE_GROUPS, "duogen:jobs:high", "duogen:jobs", 0);
    check_step(&p.steps[1], DG_TAKE_OWN, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[2], DG_TAKE_OWN, "duogen:jobs", NULL, 2);
    /* the groups are made even when nothing can be taken: a commit's XACK needs them */
    f.room = 0;
    p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 1);
    CHECK_EQ_INT(p.steps[0].source, DG_TAKE_GROUPS);
    f = facts();
    f.groups_ok = 0;
    f.draining = 1;
    p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 1);
    CHECK_EQ_INT(p.steps[0].source, DG_TAKE_GROUPS);
}

/* The read step on the wire: XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS s... >... */
TEST(take_read_cmd_arguments) {
    dg_daemon_config cfg;
    dg_daemon_config_defaults(&cfg);
    snprintf(cfg.group, sizeof cfg.group, "duogen");
    snprintf(cfg.worker_id, sizeof cfg.worker_id, "w1");
    dg_taker t = {.cfg = &cfg};
    dg_take_facts f = facts();
    dg_take_plan p = dg_take_decide(&f);
    const char *blocking[] = {"XREADGROUP", "GROUP", "duogen", "w1", "COUNT", "2", "BLOCK", "2000",
                              "STREAMS", "duogen:jobs:high", "duogen:jobs", ">", ">"};
    dg_cmd *c = dg_take_read_cmd(&t, &p.steps[0]);
    CHECK_EQ_INT(c->argc, 13);
    for (int i = 0; i < c->argc && i < 13; i++) CHECK_EQ_STR(c->argv[i], blocking[i]);
    dg_cmd_free(c);

    f.held = 1;
    f.room = 5;
    p = dg_take_decide(&f);
    const char *at_once[] = {"XREADGROUP", "GROUP", "duogen", "w1", "COUNT", "5", "STREAMS",
                             "duogen:jobs:high", "duogen:jobs", ">", ">"};
    c = dg_take_read_cmd(&t, &p.steps[0]);
    CHECK_EQ_INT(c->argc, 11);
    for (int i = 0; i < c->argc && i < 11; i++) CHECK_EQ_STR(c->argv[i], at_once[i]);
    dg_cmd_free(c);
}

int main(void) { return test_main(); }

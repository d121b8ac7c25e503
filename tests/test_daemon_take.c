/* The take policy (daemon/take.h): which commands a worker sends to get stream entries,
 * decided from plain facts with no Redis — every source of the high stream before the normal
 * one, each step's COUNT the room the steps before it left, the idle wait and its parking —
 * and the XREADGROUP a read step becomes. */
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
    f.room = -3;   /* more runs than max_inflight: nothing either */
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
    f = facts();
    f.draining = 1;
    f.own_pending = 1;
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
}

/* A busy worker with room reads the high stream first, COUNT room, then the normal one. */
TEST(take_reads_the_high_stream_then_the_normal_one) {
    dg_take_facts f = facts();
    f.room = 3;
    f.held = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 2);
    check_step(&p.steps[0], DG_TAKE_READ, "duogen:jobs:high", NULL, 3);
    check_step(&p.steps[1], DG_TAKE_READ, "duogen:jobs", NULL, 3);
    CHECK_EQ_INT(p.steps[0].block_ms, 0);      /* the engine has work: never wait */
    CHECK_EQ_INT(p.steps[1].block_ms, 0);
}

/* Idle, the same two reads, then the wait on both streams: COUNT 1, BLOCK. */
TEST(take_idle_waits_on_both_streams_after_reading_them) {
    dg_take_facts f = facts();
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 3);
    check_step(&p.steps[0], DG_TAKE_READ, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[1], DG_TAKE_READ, "duogen:jobs", NULL, 2);
    check_step(&p.steps[2], DG_TAKE_READ, "duogen:jobs:high", "duogen:jobs", 1);
    CHECK_EQ_INT(p.steps[0].block_ms, 0);
    CHECK_EQ_INT(p.steps[2].block_ms, 2000);
    f.block_ms = 0;   /* a worker told never to wait: no wait step */
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 2);
}

/* How much each step may take: the room the steps before it left, so the normal stream
 * is read only when the high stream returned fewer entries than the room; the wait runs only
 * when nothing was taken. */
TEST(take_step_counts_follow_what_was_taken) {
    dg_take_facts f = facts();
    f.room = 4;
    dg_take_plan p = dg_take_decide(&f);
    const dg_take_step *high = &p.steps[0], *normal = &p.steps[1], *wait = &p.steps[2];
    CHECK_EQ_INT(dg_take_step_count(high, 0), 4);
    CHECK_EQ_INT(dg_take_step_count(normal, 0), 4);   /* no high job waited: normal ones fill the room */
    CHECK_EQ_INT(dg_take_step_count(normal, 3), 1);   /* three high jobs: one normal */
    CHECK_EQ_INT(dg_take_step_count(normal, 4), 0);   /* the high stream filled the room: no normal read */
    CHECK_EQ_INT(dg_take_step_count(normal, 6), 0);
    CHECK_EQ_INT(dg_take_step_count(wait, 0), 1);
    CHECK_EQ_INT(dg_take_step_count(wait, 1), 0);     /* something came: no waiting */
}

/* The idle wait's reply: its normal entry runs only when the high stream returned fewer
 * entries than the COUNT (1), i.e. none; beside a high entry it is parked. */
TEST(take_idle_wait_parks_a_normal_entry_beside_a_high_one) {
    dg_take_facts f = facts();
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(dg_take_park_normal(&p.steps[2], 0), 0);
    CHECK_EQ_INT(dg_take_park_normal(&p.steps[2], 1), 1);
}

/* Every source of the high stream before any of the normal one. */
TEST(take_own_pending_entries_and_reaper_per_stream_high_first) {
    dg_take_facts f = facts();
    f.own_pending = 1;
    f.reaper_due = 1;
    f.held = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 6);
    check_step(&p.steps[0], DG_TAKE_OWN, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[1], DG_TAKE_REAP, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[2], DG_TAKE_READ, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[3], DG_TAKE_OWN, "duogen:jobs", NULL, 2);
    check_step(&p.steps[4], DG_TAKE_REAP, "duogen:jobs", NULL, 2);
    check_step(&p.steps[5], DG_TAKE_READ, "duogen:jobs", NULL, 2);
    /* the high stream's own entries filling the room end the plan before the normal stream's
     * own entries are looked at: dg_take_run keeps own_pending for the next plan */
    CHECK_EQ_INT(dg_take_step_count(&p.steps[3], 2), 0);
}

TEST(take_reaps_when_due) {
    dg_take_facts f = facts();
    f.reaper_due = 1;
    f.room = 1;
    f.held = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 4);
    check_step(&p.steps[0], DG_TAKE_REAP, "duogen:jobs:high", NULL, 1);
    check_step(&p.steps[1], DG_TAKE_READ, "duogen:jobs:high", NULL, 1);
    check_step(&p.steps[2], DG_TAKE_REAP, "duogen:jobs", NULL, 1);
    check_step(&p.steps[3], DG_TAKE_READ, "duogen:jobs", NULL, 1);
}

TEST(take_makes_groups_then_drains_own_entries) {
    dg_take_facts f = facts();
    f.groups_ok = 0;
    f.held = 1;
    dg_take_plan p = dg_take_decide(&f);
    CHECK_EQ_INT(p.n_steps, 5);
    check_step(&p.steps[0], DG_TAKE_GROUPS, "duogen:jobs:high", "duogen:jobs", 0);
    check_step(&p.steps[1], DG_TAKE_OWN, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[2], DG_TAKE_READ, "duogen:jobs:high", NULL, 2);
    check_step(&p.steps[3], DG_TAKE_OWN, "duogen:jobs", NULL, 2);
    check_step(&p.steps[4], DG_TAKE_READ, "duogen:jobs", NULL, 2);
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
    /* their creation was refused a moment ago (WRONGTYPE): nothing until its wait is over,
     * not one XGROUP CREATE a loop */
    f = facts();
    f.groups_ok = 0;
    f.groups_wait = 1;
    f.own_pending = 1;
    f.reaper_due = 1;
    CHECK_EQ_INT(dg_take_decide(&f).n_steps, 0);
}

/* The read steps on the wire: XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS s... >... */
TEST(take_read_cmd_arguments) {
    dg_daemon_config cfg;
    dg_daemon_config_defaults(&cfg);
    snprintf(cfg.group, sizeof cfg.group, "duogen");
    snprintf(cfg.worker_id, sizeof cfg.worker_id, "w1");
    dg_taker t = {.cfg = &cfg};
    dg_take_facts f = facts();
    f.room = 5;
    dg_take_plan p = dg_take_decide(&f);
    const char *high[] = {"XREADGROUP", "GROUP", "duogen", "w1", "COUNT", "5", "STREAMS", "duogen:jobs:high", ">"};
    dg_cmd *c = dg_take_read_cmd(&t, &p.steps[0]);
    CHECK_EQ_INT(c->argc, 9);
    for (int i = 0; i < c->argc && i < 9; i++) CHECK_EQ_STR(c->argv[i], high[i]);
    dg_cmd_free(c);

    const char *wait[] = {"XREADGROUP", "GROUP", "duogen", "w1", "COUNT", "1", "BLOCK", "2000",
                          "STREAMS", "duogen:jobs:high", "duogen:jobs", ">", ">"};
    c = dg_take_read_cmd(&t, &p.steps[2]);
    CHECK_EQ_INT(c->argc, 13);
    for (int i = 0; i < c->argc && i < 13; i++) CHECK_EQ_STR(c->argv[i], wait[i]);
    dg_cmd_free(c);
}

int main(void) { return test_main(); }

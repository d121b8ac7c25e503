#include "notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <time.h>

static uint64_t watchdog_usec;     /* 0: no watchdog */
static uint64_t last_ping_usec;
static char     last_status[256];
static uint64_t last_status_usec;

static uint64_t mono_usec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void dg_notify_init(void) {
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0) watchdog_usec = usec;
}

void dg_notify_ready(const char *status) {
    sd_notifyf(0, "READY=1\nSTATUS=%s", status);
    snprintf(last_status, sizeof last_status, "%s", status);
}

static void status(int phase, const char *fmt, va_list ap) {
    char buf[256];
    vsnprintf(buf, sizeof buf, fmt, ap);
    /* a status only when it changes, and progress at most 4 a second: the manager reads
     * every datagram, and a status per token would be noise (and, with a slow reader, a
     * full socket buffer that blocks the main loop) */
    if (!strcmp(buf, last_status)) return;
    uint64_t now = mono_usec();
    if (!phase && now - last_status_usec < 250000) return;
    last_status_usec = now;
    snprintf(last_status, sizeof last_status, "%s", buf);
    sd_notifyf(0, "STATUS=%s", buf);
}

void dg_notify_status(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    status(0, fmt, ap);
    va_end(ap);
}

void dg_notify_phase(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    status(1, fmt, ap);
    va_end(ap);
}

void dg_notify_extend(uint64_t usec) {
    sd_notifyf(0, "EXTEND_TIMEOUT_USEC=%llu", (unsigned long long)usec);
}

void dg_notify_stopping(const char *status) {
    sd_notifyf(0, "STOPPING=1\nSTATUS=%s", status);
    snprintf(last_status, sizeof last_status, "%s", status);
}

void dg_notify_watchdog(void) {
    if (!watchdog_usec) return;
    uint64_t now = mono_usec();
    if (now - last_ping_usec < watchdog_usec / 4) return;
    last_ping_usec = now;
    sd_notify(0, "WATCHDOG=1");
}

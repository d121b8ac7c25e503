/* The systemd notification protocol (sd_notify(3)) as duogend uses it:
 *   READY=1 once the model is loaded and warmed up; STATUS= on each phase; WATCHDOG=1 from the main
 *   loop when WATCHDOG_USEC is set; EXTEND_TIMEOUT_USEC= while loading and draining;
 *   STOPPING=1 when shutdown begins. Without NOTIFY_SOCKET every call is a no-op. */
#ifndef DG_NOTIFY_H
#define DG_NOTIFY_H

#include <stdint.h>

void dg_notify_init(void);     /* reads WATCHDOG_USEC once */
void dg_notify_ready(const char *status);
/* STATUS= when it changes, at most 4 a second (progress: a later call says it again). */
void dg_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* STATUS= of a phase (loading, warming up, failed): sent whenever it changes, never held
 * back by the rate of dg_notify_status. */
void dg_notify_phase(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void dg_notify_extend(uint64_t usec);
void dg_notify_stopping(const char *status);
/* Sends WATCHDOG=1 when a quarter of the watchdog interval has passed since the last one.
 * Call it from the loop whose progress it vouches for. */
void dg_notify_watchdog(void);

#endif

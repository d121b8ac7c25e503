/* clock.h — the monotonic clock the engine's timings (dg_timings) are measured with.
 * Shared by the scheduler and the drawing code; neither needs the other for it. */
#ifndef DG_CLOCK_H
#define DG_CLOCK_H

/* Milliseconds on CLOCK_MONOTONIC: only differences mean anything. */
double dg_clock_now_ms(void);

#endif

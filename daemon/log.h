/* Logging for the daemon and tools: one line per event, "func: message", user strings in
 * quotes by the caller. Under systemd (JOURNAL_STREAM set) each line starts with the
 * journal's <N> priority prefix; on a terminal it starts with a UTC time and the level.
 * The level is checked before anything is formatted. */
#ifndef DG_LOG_H
#define DG_LOG_H

enum { DG_LOG_ERR = 3, DG_LOG_WARNING = 4, DG_LOG_INFO = 6, DG_LOG_DEBUG = 7 };

extern int dg_log_level;   /* lines above this priority number are skipped */

void dg_log_init(void);    /* reads JOURNAL_STREAM; call once before threads start */
int  dg_log_parse_level(const char *name);   /* "err", "warning", "info", "debug"; -1 if unknown */
void dg_log_write(int level, const char *func, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_at(level, ...)                                                      \
    do { if ((level) <= dg_log_level) dg_log_write((level), __func__, __VA_ARGS__); } while (0)
#define log_error(...) log_at(DG_LOG_ERR, __VA_ARGS__)
#define log_warn(...)  log_at(DG_LOG_WARNING, __VA_ARGS__)
#define log_info(...)  log_at(DG_LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_at(DG_LOG_DEBUG, __VA_ARGS__)

#endif

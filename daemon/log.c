#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int dg_log_level = DG_LOG_INFO;
static int journal;   /* stderr is connected to the journal: use <N> prefixes */

void dg_log_init(void) {
    journal = getenv("JOURNAL_STREAM") != NULL;
}

int dg_log_parse_level(const char *name) {
    static const struct { const char *name; int level; } levels[] = {
        {"err", DG_LOG_ERR}, {"error", DG_LOG_ERR}, {"warning", DG_LOG_WARNING},
        {"warn", DG_LOG_WARNING}, {"info", DG_LOG_INFO}, {"debug", DG_LOG_DEBUG},
    };
    for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++)
        if (!strcmp(name, levels[i].name)) return levels[i].level;
    return -1;
}

void dg_log_write(int level, const char *func, const char *fmt, ...) {
    char line[2048];
    int n;
    if (journal) {
        n = snprintf(line, sizeof line, "<%d>%s: ", level, func);
    } else {
        static const char *names[8] = {"", "", "", "error", "warning", "", "info", "debug"};
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %s %s: ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, names[level & 7], func);
    }
    if (n < 0 || (size_t)n >= sizeof line) n = 0;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2) len = sizeof line - 2;
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);   /* one write per line: lines of two threads never mix */
}

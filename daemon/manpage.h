/* manpage.h — manual pages in roff (man(7) macros), written by the programs they describe
 * from the same tables as their --help (daemon_config.c's settings, duogenctl's commands),
 * so that the pages cannot drift from the code. The build writes them into build/man/ with
 * the hidden option --man; `make install` installs them.
 *
 *   duogend --man 8      > duogend.8        the worker
 *   duogend --man 5      > duogend.conf.5   its configuration file
 *   duogenctl --man      > duogenctl.1      (tools/duogenctl/main.c)
 *
 * The writers only write to `out`; a stream error shows in ferror(out). */
#ifndef DG_MANPAGE_H
#define DG_MANPAGE_H

#include <stdio.h>

/* Writes `text` as roff text: '\' as \e, '-' as \- (a minus, never a hyphenation point),
 * and a '.' or '\'' that would start a line guarded with \&, so that data from a table is
 * never read as a request. */
void dg_man_text(FILE *out, const char *text);

/* The page's .TH line and its NAME section: "name \- summary". */
void dg_man_head(FILE *out, const char *name, const char *section, const char *summary);

/* duogend(8) for section "8", duogend.conf(5) for "5". Returns 0, or -1 for another section. */
int dg_man_duogend(FILE *out, const char *section);

#endif

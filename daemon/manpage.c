#include "manpage.h"

#include <string.h>

#include "daemon_config.h"

void dg_man_text(FILE *out, const char *text) {
    int line_start = 1;
    for (const char *p = text; *p; p++) {
        if (line_start && (*p == '.' || *p == '\'')) fputs("\\&", out);
        if (*p == '\\') fputs("\\e", out);
        else if (*p == '-') fputs("\\-", out);
        else fputc(*p, out);
        line_start = *p == '\n';
    }
}

void dg_man_head(FILE *out, const char *name, const char *section, const char *summary) {
    char upper[64];
    size_t n = strlen(name) < sizeof upper - 1 ? strlen(name) : sizeof upper - 1;
    for (size_t i = 0; i < n; i++) upper[i] = (char)(name[i] >= 'a' && name[i] <= 'z' ? name[i] - 32 : name[i]);
    upper[n] = 0;
    fputs(".\\\" Written by the program's --man from the tables of its --help: edit those, not this page.\n", out);
    /* left-aligned and unhyphenated: URLs and key names must not break at a hyphen */
    fprintf(out, ".TH %s %s \"\" duogen \"duogen manual\"\n.ad l\n.nh\n.SH NAME\n", upper, section);
    dg_man_text(out, name);
    fputs(" \\- ", out);
    dg_man_text(out, summary);
    fputc('\n', out);
}

/* The settings under .SS headings, each as a .TP item: the option (or the file's key) with
 * its value's kind, the help line, the default and the range. */
static void write_settings(FILE *out, int as_options) {
    dg_daemon_setting s;
    const char *group = "";
    for (size_t i = 0; !dg_daemon_config_setting(i, &s); i++) {
        if (strcmp(group, s.group)) {
            fputs(".SS ", out);
            dg_man_text(out, s.group);
            fputc('\n', out);
        }
        group = s.group;
        const char *placeholder = !strcmp(s.kind, "integer") ? "N" : s.kind;
        fputs(".TP\n\\fB", out);
        if (as_options) {
            char opt[64];
            snprintf(opt, sizeof opt, "--%s", s.name);
            for (char *p = opt + 2; *p; p++) if (*p == '_') *p = '-';
            dg_man_text(out, opt);
            fprintf(out, "\\fR \\fI%s\\fR\n", placeholder);
        } else {
            dg_man_text(out, s.name);
            fprintf(out, "\\fR = \\fI%s\\fR\n", placeholder);
        }
        dg_man_text(out, s.help);
        fputs(".\n.br\nDefault: \\fB", out);
        dg_man_text(out, s.value[0] ? s.value : "none");
        fputs("\\fR", out);
        if (s.range[0]) {
            fputs("; allowed: ", out);
            dg_man_text(out, s.range);
        }
        fputc('\n', out);
    }
}

static const char daemon_description[] =
    ".SH SYNOPSIS\n"
    ".B duogend\n"
    "[\\fB\\-\\-config\\fR \\fIfile\\fR] [\\fB\\-\\-\\fIsetting\\fR \\fIvalue\\fR]...\n"
    ".SH DESCRIPTION\n"
    ".B duogend\n"
    "is the duogen worker. It opens one model package on one device, takes jobs (protobuf\n"
    "\\fBJob\\fR messages) from the Redis streams \\fIprefix\\fB:jobs:high\\fR and\n"
    "\\fIprefix\\fB:jobs\\fR through a consumer group, renders each interleaved text\\-and\\-image\n"
    "answer, and writes its progress events, PNG images and result back to Redis, where\n"
    "producers read them. One process runs per GPU, usually as the systemd unit\n"
    "\\fBduogend@\\fIN\\fB.service\\fR.\n"
    ".PP\n"
    "Delivery is at least once and the visible result exactly once: the result, the final\n"
    "event, the \\fIprefix\\fB:done\\fR entry and the acknowledgement are written in one\n"
    "transaction. A job that keeps failing goes to \\fIprefix\\fB:dead\\fR after\n"
    "\\fBmax_attempts\\fR deliveries.\n"
    ".PP\n"
    "Settings come from their defaults, then the file given by \\fB\\-\\-config\\fR (see\n"
    ".BR duogend.conf (5)),\n"
    "then the command line, each overriding the one before. Every setting of the file is an\n"
    "option: \\fB\\-\\-\\fIname\\fR \\fIvalue\\fR, with dashes or underscores;\n"
    "\\fB\\-\\-redis\\fR is short for \\fB\\-\\-redis\\-url\\fR.\n"
    ".SH OPTIONS\n"
    ".TP\n\\fB\\-\\-config\\fR \\fIfile\\fR\nRead settings from \\fIfile\\fR first.\n"
    ".TP\n\\fB\\-\\-help\\fR, \\fB\\-h\\fR\nList the settings with their defaults and exit.\n";

static const char daemon_tail[] =
    ".SH SIGNALS\n"
    ".TP\n\\fBSIGTERM\\fR, \\fBSIGINT\\fR\n"
    "Take no new jobs; running jobs get \\fBdrain_ms\\fR to finish, after which they stay\n"
    "pending for another worker, their delivery not counted against \\fBmax_attempts\\fR; then\n"
    "exit 0. A second signal stops at once.\n"
    ".TP\n\\fBSIGHUP\\fR, \\fBSIGUSR1\\fR, \\fBSIGUSR2\\fR\n"
    "Said on standard error and ignored: the settings are read at start only (restart the\n"
    "worker to change them).\n"
    ".SH EXIT STATUS\n"
    ".TP\n\\fB0\\fR\nA clean stop.\n"
    ".TP\n\\fB75\\fR\nThe engine or the device failed: restart the worker.\n"
    ".TP\n\\fB78\\fR\nA configuration problem, a model that cannot be opened, or Redis refusing the\n"
    "credentials (a wrong password, none given where one is wanted, one given where none is\n"
    "set), the database index or commands: restarting would not help (the unit's\n"
    "\\fBRestartPreventExitStatus=78\\fR).\n"
    ".SH ENVIRONMENT\n"
    ".TP\n\\fBNOTIFY_SOCKET\\fR\n"
    "Set by systemd for \\fBType=notify\\fR: the worker sends \\fBREADY=1\\fR once the model is\n"
    "loaded, \\fBSTATUS=\\fR for each phase, \\fBWATCHDOG=1\\fR from its main loop,\n"
    "\\fBEXTEND_TIMEOUT_USEC=\\fR while loading and draining, and \\fBSTOPPING=1\\fR.\n"
    ".TP\n\\fBJOURNAL_STREAM\\fR\n"
    "Set by systemd when standard error goes to the journal: log lines carry\n"
    "\\fB<3>\\fR, \\fB<4>\\fR, \\fB<6>\\fR priority prefixes.\n"
    ".TP\n\\fBDG_CUDA_MODULE\\fR\n"
    "Path of the CUDA backend module loaded on the first \\fBcuda:\\fIN\\fR device (then there\n"
    "only), instead of the one beside the program, one folder up, or in \\fB../lib/duogen/\\fR\n"
    "from it (an installed tree).\n"
    ".TP\n\\fBDG_GPU_MEMORY\\fR\n"
    "The GPU memory the CUDA backend takes at start (e.g. \\fB24G\\fR) when \\fBgpu_memory\\fR is\n"
    "0; unset, 90% of the free memory.\n"
    ".TP\n\\fBDG_CUDA_UNVERIFIED\\fR\n"
    "\\fB1\\fR: the CUDA kernels written since their last comparison with the CPU on a device\n"
    "are used (kernels/cuda/NOTES.md lists them); otherwise their verified alternatives run.\n"
    ".TP\n\\fBDG_CUDA_GRAPHS\\fR\n"
    "\\fB1\\fR: the decode step's fixed runs are recorded as CUDA graphs and replayed.\n"
    ".TP\n\\fBDG_SEEDED_WEIGHTS\\fR\n"
    "\\fB1\\fR: a package whose weights are marked seeded (mkmodel \\fB\\-\\-seeded\\fR, for\n"
    "benchmarks) has them filled from the seed; otherwise such a package is refused.\n"
    ".SH FILES\n"
    ".TP\n\\fI/etc/duogen/duogend.conf\\fR\nThe settings the unit passes with \\fB\\-\\-config\\fR.\n"
    ".TP\n\\fI/etc/duogen/redis\\-password\\fR\n"
    "The Redis password, handed to the worker as a systemd credential.\n"
    ".SH SEE ALSO\n"
    ".BR duogenctl (1),\n.BR duogend.conf (5),\n.BR systemd.service (5),\n.BR redis\\-server (1)\n";

static const char conf_description[] =
    ".SH SYNOPSIS\n"
    ".I /etc/duogen/duogend.conf\n"
    ".SH DESCRIPTION\n"
    "The settings of\n"
    ".BR duogend (8),\n"
    "one per line as \\fIkey\\fR \\fB=\\fR \\fIvalue\\fR. A \\fB#\\fR starts a comment that runs\n"
    "to the end of the line; blank lines are skipped; a value may be put in double quotes.\n"
    "An unknown key or a value out of range stops the worker with exit status 78 and a\n"
    "message naming the file, the line and the key. Options on the command line override\n"
    "the file.\n"
    ".PP\n"
    "A \\fIsize\\fR is a number of bytes with an optional \\fBk\\fR, \\fBM\\fR or \\fBG\\fR\n"
    "(powers of 1024): \\fB4096\\fR, \\fB64k\\fR, \\fB20M\\fR, \\fB1G\\fR. An \\fIN\\fR is a\n"
    "decimal integer in the range given.\n"
    ".SH SETTINGS\n";

static const char conf_tail[] =
    ".SH EXAMPLE\n"
    ".EX\n"
    "redis_url = redis://duogen\\-worker@redis.internal:6379/0\n"
    "model = /srv/duogen/models/duogen\\-7b\n"
    "claim_idle_ms = 60000   # a dead worker's job is taken over after this\n"
    "max_job_bytes = 64M\n"
    ".EE\n"
    ".SH SEE ALSO\n"
    ".BR duogend (8),\n.BR duogenctl (1)\n";

int dg_man_duogend(FILE *out, const char *section) {
    if (!strcmp(section, "8")) {
        dg_man_head(out, "duogend", "8", "the duogen worker daemon");
        fputs(daemon_description, out);
        write_settings(out, 1);
        fputs(daemon_tail, out);
        return 0;
    }
    if (!strcmp(section, "5")) {
        dg_man_head(out, "duogend.conf", "5", "settings of the duogen worker");
        fputs(conf_description, out);
        write_settings(out, 0);
        fputs(conf_tail, out);
        return 0;
    }
    return -1;
}

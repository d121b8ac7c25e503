/* duogen.h — the engine's public interface: the only engine header the daemon includes.
 *
 * The engine turns a conversation (text and images) into an interleaved answer: the MLLM
 * writes text, and on <BOV> the DiT draws an image that goes back into the context. It
 * knows nothing of Redis or protobuf; results leave through a table of callbacks.
 *
 * Usage (one thread owns a scheduler; a model may be shared by several schedulers, see
 * "Threads" below):
 *
 *     dg_model *m; dg_sched *s; char err[256]; uint64_t seq;
 *     if (dg_model_open("models/tiny", &(dg_model_opts){.device = "cpu"}, &m, err, sizeof err))
 *         die("%s", err);
 *     if (dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err))
 *         die("%s", err);
 *     dg_sched_submit(s, &request, &sink, &seq, err, sizeof err);
 *     while (dg_sched_active(s) > 0)
 *         if (dg_sched_step(s, err, sizeof err) < 0) die("%s", err);   // fatal: exit
 *     dg_sched_free(s);
 *     dg_model_close(m);
 *
 * Errors are negative DG_E* values; dg_error_class() tells what the caller should do.
 * Error messages name what was wrong ("image 2: not a PNG or JPEG (first bytes 47 49 46)").
 *
 * Threads:
 *   - A dg_model is read-only once dg_model_open() has returned. Any number of schedulers
 *     may share it, created by dg_sched_new() on any thread (several at once too), and
 *     they step concurrently, each on its own thread: a scheduler computes on its own fork
 *     of the model's compute backend (its own scratch; on a GPU its own stream, cuBLAS
 *     handles, staging buffers and device error), sharing with the others only the
 *     weights and, on a GPU, the device memory the model took at open. A job's answer
 *     does not depend on what other schedulers run beside it.
 *   - Every call on one scheduler (dg_sched_submit, _step, _cancel, _active,
 *     _cache_stats, _free) comes from one thread at a time; which thread may change
 *     between calls. Its sink's callbacks run on the calling thread.
 *   - dg_model_close() comes after every scheduler of the model is freed.
 *   - dg_model_describe(), dg_error_class() and dg_error_name() may be called from any
 *     thread at any time.
 *   - A device fault (DG_EDEVICE from dg_sched_step) is reported by the scheduler whose
 *     work met it; a GPU that faulted is usually lost to every scheduler of the process,
 *     whose process should end (fatal, as the error class says).
 */
#ifndef DUOGEN_H
#define DUOGEN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ---------------------------------------------------------------------------
 * Each code belongs to one class:
 *   bad input  the request is wrong: fail the job with the message, keep the worker;
 *   retryable  a passing condition (memory pressure, capacity): the job may run again later;
 *   fatal      the engine cannot go on (device fault, broken model): the process should exit
 *              and let its supervisor restart it. */
enum {
    DG_OK        = 0,
    DG_EINVAL    = -1,  /* bad input: malformed request or parameter out of range */
    DG_EIMAGE    = -2,  /* bad input: an image that cannot be decoded or is too large */
    DG_ELIMIT    = -3,  /* bad input: over a configured limit (tokens, pixels, images) */
    DG_EAGAIN    = -4,  /* retryable: no free slot or cache capacity now */
    DG_ENOMEM    = -5,  /* retryable: an allocation failed */
    DG_EMODEL    = -6,  /* fatal: the model package is missing, malformed or inconsistent */
    DG_EDEVICE   = -7,  /* fatal: the compute device failed */
    DG_EINTERNAL = -8,  /* fatal: a broken invariant inside the engine */
};

typedef enum {
    DG_ERROR_BAD_INPUT,
    DG_ERROR_RETRYABLE,
    DG_ERROR_FATAL,
} dg_error_class_t;

dg_error_class_t dg_error_class(int code);
const char      *dg_error_name(int code);   /* "EINVAL", ...; never NULL */

/* Length of the longest valid UTF-8 prefix of s[0..n): no overlong forms, surrogates or
 * code points past U+10FFFF; n when all of it is valid. Callable from any thread. */
size_t dg_utf8_valid_prefix(const char *s, size_t n);

/* ---- requests ---------------------------------------------------------------------------
 * All request memory is borrowed for the duration of dg_sched_submit(): the engine copies
 * (or decodes) what it keeps. */

typedef enum { DG_PART_TEXT, DG_PART_IMAGE } dg_part_kind;

typedef struct {
    dg_part_kind   kind;
    const char    *text;        /* DG_PART_TEXT: UTF-8, text_len bytes */
    size_t         text_len;
    const uint8_t *image;       /* DG_PART_IMAGE: encoded PNG or JPEG bytes */
    size_t         image_len;
} dg_part;

typedef enum { DG_ROLE_SYSTEM, DG_ROLE_USER, DG_ROLE_ASSISTANT } dg_role;

typedef struct {
    dg_role        role;
    const dg_part *parts;
    size_t         n_parts;
} dg_message;

typedef struct {
    int32_t token;
    float   bias;               /* added to the token's logit; -INFINITY bans it */
} dg_logit_bias;

/* The most pictures one conversation holds, given and drawn: a request with more input
 * images fails with DG_ELIMIT; at it, <BOV> is banned and the text goes on. */
#define DG_MAX_IMAGES 32

/* Parameters carry presence: `set` is a bit set of the fields that hold a value (the
 * DG_TEXT_* and DG_IMAGE_* bits below). A field whose bit is clear takes the package's
 * default (duogen.json "defaults"), whatever it holds; a field whose bit is set is used as
 * it is, 0 included: temperature 0 is greedy, guidance_scale 0 draws without guidance,
 * max_images 0 draws nothing. A zeroed struct asks for every default. A set value out of
 * its range fails dg_sched_submit() with DG_EINVAL and a message naming the field
 * ("text.top_p: 0 is not in (0, 1]"). The lists (stop, logit_bias) have no bit: empty is
 * none. */
enum {
    DG_TEXT_MAX_NEW_TOKENS     = 1u << 0,
    DG_TEXT_TEMPERATURE        = 1u << 1,
    DG_TEXT_TOP_P              = 1u << 2,
    DG_TEXT_TOP_K              = 1u << 3,
    DG_TEXT_REPETITION_PENALTY = 1u << 4,
};

typedef struct {
    uint32_t             set;                /* DG_TEXT_* bits: the fields below that hold a value */
    int32_t              max_new_tokens;     /* >= 1 */
    float                temperature;        /* >= 0; 0 = greedy */
    float                top_p;              /* (0, 1]; 1 = off */
    int32_t              top_k;              /* >= 0; 0 = off */
    float                repetition_penalty; /* > 0; 1 = off */
    const char *const   *stop;               /* stop strings, n_stop of them */
    size_t               n_stop;
    const dg_logit_bias *logit_bias;
    size_t               n_logit_bias;
} dg_text_params;

/* The flow sampler's sigma schedule (docs/specs/cosmos_dit_wan_vae.md §5.2). */
typedef enum {
    DG_SCHEDULE_KARRAS,    /* post-trained Cosmos-Predict2.5: Karras sigmas 0.01..200, rho 7; no shift */
    DG_SCHEDULE_SHIFTED,   /* shifted linear sigmas (pre-trained Cosmos-Predict2.5), by `shift` */
} dg_schedule;

enum {
    DG_IMAGE_WIDTH          = 1u << 0,
    DG_IMAGE_HEIGHT         = 1u << 1,
    DG_IMAGE_STEPS          = 1u << 2,
    DG_IMAGE_GUIDANCE_SCALE = 1u << 3,
    DG_IMAGE_MAX_IMAGES     = 1u << 4,
    DG_IMAGE_SHIFT          = 1u << 5,
    DG_IMAGE_SCHEDULE       = 1u << 6,
};

typedef struct {
    uint32_t    set;             /* DG_IMAGE_* bits: the fields below that hold a value */
    int32_t     width, height;   /* pixels of generated images: positive multiples of the VAE
                                    factor times the DiT patch (16) */
    int32_t     steps;           /* denoising steps, 1..1000 */
    float       guidance_scale;  /* 0..100: v = v_c + g·(v_c − v_u); 0 = no guidance, one DiT
                                    forward per step instead of two (a package imported from
                                    a published pipeline: no guidance up to 1, as its code) */
    int32_t     max_images;      /* >= 0: after this many images <BOV> is banned (as it is
                                    once the conversation holds DG_MAX_IMAGES, given and drawn) */
    float       shift;           /* [0.001, 100], the shifted schedule's; set without DG_IMAGE_SCHEDULE
                                    it selects DG_SCHEDULE_SHIFTED, and with
                                    DG_SCHEDULE_KARRAS it is an error */
    dg_schedule schedule;
} dg_image_params;

typedef struct {
    const char *key;
    const char *value;
} dg_kv;

typedef struct {
    const char       *id;                /* job id, for messages and PNG text chunks */
    const dg_message *messages;
    size_t            n_messages;
    dg_text_params    text;
    dg_image_params   image;
    uint64_t          seed;
    int64_t           deadline_unix_ms;  /* 0: none; past it the sequence ends DG_FINISH_DEADLINE */
    const dg_kv      *metadata;          /* free-form job metadata, n_metadata pairs */
    size_t            n_metadata;
} dg_request;

/* ---- results ------------------------------------------------------------------------------ */

typedef enum {
    DG_FINISH_STOP,        /* EOS or a stop string */
    DG_FINISH_LENGTH,      /* max_new_tokens reached, or the context full: no room for the
                              next token, or for the picture a <BOV> began (its tokens go
                              back into the context; a size that alone fills it is refused
                              at submit) */
    DG_FINISH_CANCELLED,   /* dg_sched_cancel() */
    DG_FINISH_DEADLINE,    /* deadline_unix_ms passed */
} dg_finish_reason;

typedef struct {
    int64_t prompt_tokens;
    int64_t cached_prompt_tokens;    /* served by the prefix KV cache */
    int64_t generated_tokens;
    int64_t images;
    int64_t cached_latents;          /* condition frames whose VAE latent came from the cache */
    int64_t cached_vision;           /* images, given or drawn, the vision tower did not run on:
                                        every position of theirs came from the prefix KV cache,
                                        or their output from the vision cache or from the same
                                        picture earlier in the request */
    int64_t dit_forwards;            /* DiT network evaluations: steps per image, twice that
                                        with guidance (both branches run in one forward) */
    int64_t nonfinite_images;        /* drawn pictures whose decoded values held NaN or
                                        infinities (black there): a warm-up with one refuses
                                        the package */
} dg_usage;

/* Where a job's time went. A forward that served several jobs at once (docs/DESIGN.md §6
 * "Batching") counts for each by its share of the forward's rows, so the jobs' times add
 * up to the worker's. */
typedef struct {
    double prefill_ms, decode_ms, vision_ms, diffusion_ms, vae_ms, total_ms;
} dg_timings;

/* Callbacks run on the thread that calls dg_sched_step() (or dg_sched_submit() for errors
 * found there). Pointers passed in are borrowed for the call only. Exactly one of
 * finished() and failed() is called per submitted sequence, and nothing after it. */
typedef struct {
    void *user;
    void (*text)(void *user, const char *delta, size_t len);            /* whole UTF-8 characters */
    void (*image_started)(void *user, int index, int width, int height, int steps);
    void (*step)(void *user, int index, int step, int steps);           /* after denoising step `step` (1-based) */
    void (*image_done)(void *user, int index, int width, int height,
                       const uint8_t *png, size_t png_len);
    void (*finished)(void *user, dg_finish_reason reason, const dg_usage *usage,
                     const dg_timings *timings);
    void (*failed)(void *user, int code, const char *message);
} dg_sink;

/* ---- model and scheduler ------------------------------------------------------------------- */

typedef struct dg_model dg_model;   /* loaded weights; read-only after open, shared by schedulers */
typedef struct dg_sched dg_sched;   /* one per worker thread: sequences, KV blocks, caches, and
                                       its own compute scratch (see "Threads" above) */

typedef struct {
    const char *device;             /* "cpu" or "cuda:N"; NULL = "cpu" */
    int         threads;            /* CPU threads of each scheduler's operations (schedulers
                                       stepping at once use as many each); 0 = all cores */
    size_t      device_memory;      /* bytes a GPU device may take (pool sized once at open,
                                       for the weights and every scheduler's buffers, ~300 MiB
                                       of scratch each among them); 0 = DG_GPU_MEMORY or 90%
                                       of the free memory */
    int         cpu_bf16_compute;   /* CPU: 1 = the matmuls over BF16 weights round their
                                       activations to bf16 and sum bf16 products (where the
                                       CPU has AVX-512 BF16 they run ~1.9x, a prefill ~1.5x;
                                       logits move by up to ~0.04: engine/MODELS.md "bf16
                                       compute"); 0 = fp32, the default */
    int         cpu_mapped_weights; /* CPU: 1 = the weights are read where the files are
                                       memory-mapped (page cache shared between processes);
                                       0 = copied at load into transparent huge pages, the
                                       default (decode 3-10% faster: engine/MODELS.md) */
    int         logit_screen;       /* greedy and top-k tokens from the logit screen (MODELS.md
                                       "The logit screen"): bounds on every logit from an int8
                                       copy of the lm_head, then only the rows that could win
                                       read in full; the same tokens, a decode step reading
                                       ~half the lm_head's bytes, for that copy's memory (half
                                       the lm_head's bf16 size). 0: on where it pays (a CPU with
                                       AVX-512 VNNI, for steps of up to 2 such rows at one
                                       thread, 4 at more), the default; -1: off; 1: wherever the
                                       device has it, for any number of rows (tests) */
    /* Called now and then during a long load (at least every few seconds), so that a
     * supervisor can be told the process is alive. May be NULL. */
    void      (*progress)(void *user, const char *phase, double fraction);
    void       *progress_user;
} dg_model_opts;

typedef struct {
    int     max_inflight;           /* sequences stepped together (one decoder forward a step
                                       for all, docs/DESIGN.md §6 "Batching"); 0 = as many as
                                       the memory holds, each at its full context with as
                                       much KV again for cached prefixes: kv_cache_bytes'
                                       worth when set, else half the device's (CPU: the
                                       host's available, within the process's cgroup
                                       limits) free memory, between 1 and 16 */
    size_t  kv_cache_bytes;         /* the KV pool: running sequences and cached prefixes
                                       together; 0 = room for every sequence at its full
                                       context and as much again for prefixes */
    int     kv_bf16;                /* 1: K and V kept in bf16 (half the memory, so twice the
                                       sequences or cached prefix in a budget; fidelity:
                                       engine/MODELS.md "KV in bf16"); -1: fp32; 0: the
                                       backend's default (kv_bf16_default: fp32 on the CPU,
                                       bf16 on a GPU whose bf16 attention is in use) */
    size_t  latent_cache_bytes;     /* VAE latent cache budget (host memory); 0 = 64 latents of
                                       the package's default image size */
    size_t  vision_cache_bytes;     /* vision-tower output cache budget (host memory); 0 = the
                                       rows of 64 images of the package's default image size */
    int     draft_tokens;           /* speculative decoding by prompt lookup (engine/MODELS.md
                                       "Drafts"): a decoding sequence whose last tokens
                                       occurred before in its context feeds, with its next
                                       token, up to this many of the tokens that followed
                                       them, and keeps those the model chooses itself: the
                                       same answer, fewer forwards where text repeats. -1:
                                       off; 0: the default: 2 where the backend's rows are
                                       exact at any batch size (the CPU) and a decode token
                                       reads 64 MiB of weights or more; else off (a GPU, a
                                       decoder that stays in cache); 1 .. 7 */
    int64_t max_condition_pixels;   /* an earlier image larger than this is scaled down (aspect
                                       kept) before it becomes a condition frame of the DiT;
                                       0 = 1024² (every image otherwise keeps its own size) */
    int64_t max_image_pixels;       /* an input image of more pixels is refused (DG_ELIMIT)
                                       before it is decoded; 0 = 50M (a 64 MP photo needs more;
                                       decoding takes 3 bytes a pixel while the job runs) */
    int     max_condition_frames;   /* a picture is conditioned on this many earlier pictures
                                       of its conversation at most, the latest (each is a frame
                                       of the DiT's sequence: its tokens and, with guidance,
                                       twice); 0 = all of them (up to DG_MAX_IMAGES - 1) */
} dg_sched_opts;

/* Cache counters, cumulative since dg_sched_new() less the warm-up's (dg_sched_warmup).
 * Prefix KV: hits and misses are full prompt blocks (16 tokens) found and not
 * found; kv_bytes is the pool, kv_cached_bytes its blocks a later prompt can reuse. Latent
 * and vision: pictures, and the bytes held. */
typedef struct {
    int64_t kv_hits, kv_misses;         size_t kv_bytes, kv_cached_bytes;
    int64_t latent_hits, latent_misses; size_t latent_bytes;
    int64_t vision_hits, vision_misses; size_t vision_bytes;
} dg_cache_stats;

/* A one-line description of the loaded model ("tiny: qwen2.5-vl 2L/64d + cosmos 2L"). */
const char *dg_model_describe(const dg_model *m);
int  dg_model_open(const char *dir, const dg_model_opts *o, dg_model **out, char *err, size_t errlen);
void dg_model_close(dg_model *m);   /* accepts NULL */

int  dg_sched_new(dg_model *m, const dg_sched_opts *o, dg_sched **out, char *err, size_t errlen);
void dg_sched_free(dg_sched *s);    /* accepts NULL; ends live sequences without callbacks */

/* Admits a request. On success *seq names the sequence and the sink will hear of it until
 * finished() or failed(). A bad request returns its DG_E* code with the message in err and
 * the sink is not called. DG_EAGAIN when max_inflight sequences are active. */
int  dg_sched_submit(dg_sched *s, const dg_request *r, const dg_sink *sink, uint64_t *seq,
                     char *err, size_t errlen);

/* Advances every active sequence by one prefill chunk, decode token or denoising step, in
 * one decoder forward for all and one DiT forward per image layout. Per-sequence
 * problems go to that sequence's failed() and return 0; a negative return is fatal for the
 * whole scheduler (the caller should exit). */
int  dg_sched_step(dg_sched *s, char *err, size_t errlen);

/* Asks a sequence to stop: its finished(DG_FINISH_CANCELLED) arrives during the next
 * dg_sched_step(). Returns DG_EINVAL for an unknown or ended sequence. */
int  dg_sched_cancel(dg_sched *s, uint64_t seq);

/* One small job through every part the model has, on an idle scheduler, before it serves:
 * a short prompt's prefill and two greedy tokens; where the model draws with <BOV>, one
 * picture of the smallest size in one denoising step (both guidance branches), its VAE
 * decode, and its way back through the vision tower. A device or package that cannot run a
 * job fails here (its DG_E* code, the message in err, prefixed "warm-up: ") instead of on the
 * first job; kernels load and workspaces grow before the first job's clock starts. What it
 * did is in *usage (may be NULL). It leaves its prompt in the prefix cache, as any job; no
 * answer changes; its counts are not in the stats below. DG_EINVAL while sequences are
 * active. */
int  dg_sched_warmup(dg_sched *s, dg_usage *usage, char *err, size_t errlen);

int  dg_sched_active(const dg_sched *s);
/* The sequences it steps together: dg_sched_opts.max_inflight, or what 0 came to. */
int  dg_sched_max_inflight(const dg_sched *s);
/* The free memory max_inflight 0 was sized from, as dg_sched_new read it (the CPU:
 * MemAvailable within the process's cgroup limits; CUDA: the arena's free bytes); 0 where
 * max_inflight or kv_cache_bytes was set, or the device could not say. */
size_t dg_sched_sized_from(const dg_sched *s);
/* The sequences its KV pool holds at the model's full context at once (with max_inflight
 * 0 or no kv_cache_bytes, twice max_inflight: the prefix cache's share). Fewer than
 * max_inflight: long answers beside each other may find the pool full and fail DG_EAGAIN. */
int  dg_sched_kv_holds(const dg_sched *s);
/* What a request gets for each field it does not set: the package's defaults (duogen.json
 * "defaults"), every field a value. */
void dg_sched_defaults(const dg_sched *s, dg_text_params *text, dg_image_params *image);
void dg_sched_cache_stats(const dg_sched *s, dg_cache_stats *out);
/* Drafted tokens fed and kept since dg_sched_new (dg_sched_opts draft_tokens). */
void dg_sched_draft_stats(const dg_sched *s, int64_t *drafted, int64_t *kept);
/* Greedy and top-k tokens chosen from the logit screen's bounds (dg_model_opts
 * logit_screen), and those whose bounds did not decide (their logits computed whole), since
 * dg_sched_new. */
void dg_sched_screen_stats(const dg_sched *s, int64_t *screened, int64_t *unscreened);

#ifdef __cplusplus
}
#endif
#endif

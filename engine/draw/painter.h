/* painter.h — drawing one image of an interleaved answer (docs/DESIGN.md §2 step 4, §6), from the
 * condition rows of a context and the earlier images to an 8-bit RGB image, one denoising
 * step per call. The painter knows nothing of sequences, tokens or the scheduler: its
 * caller says which condition positions and which earlier images to use, emits the
 * events, and puts the finished image into its context.
 *
 *   semantic condition  the connector over the caller's accumulated condition rows:
 *                       positions [0, n_pos) for the conditional branch, [0, n_neg) for the
 *                       unconditional (CFG) one (of a second accumulator when the caller
 *                       conditions as a published pipeline does: prompt_cond.h)
 *   visual condition    every earlier image, given or drawn, as a clean VAE latent frame at
 *                       its own resolution (docs/specs/duogen_paper.md "Visual conditions":
 *                       spatial RoPE from each image's native size): its width and height
 *                       rounded to multiples of the VAE factor times the DiT patch (16 px),
 *                       scaled down first, aspect kept, when it has more than
 *                       max_condition_pixels pixels or more patches than the DiT's RoPE
 *                       range; the latent is the VAE encoding of the image's 8-bit pixels at
 *                       that size, from the latent cache when the image (by content hash)
 *                       was encoded at that size before, else encoded and put there. A drawn
 *                       image is no exception (its sampler latent is not what its PNG decodes
 *                       to), so a condition is the same whatever a cache holds
 *   sampling            the flow-matching sampler (UniPC over the schedule the params
 *                       name: the post-trained Karras one or the shifted one), one call per
 *                       denoising step, classifier-free guidance with the visual conditions
 *                       in both branches (guidance_scale 0: the conditional branch alone,
 *                       one DiT forward per step); the target's noise is stream
 *                       seed·0x9E3779B97F4A7C15 + index + 1, so a job draws the same images
 *                       on every machine
 *   finish              VAE decode into 8-bit RGB and its content hash
 *
 * Usage (one painter per scheduler slot, kept from image to image: its buffers grow to the
 * largest image seen, at begin, never during the steps):
 *
 *     dg_painter *p;
 *     dg_painter_new(&m->dit, &m->vae, &m->conn, be, NULL, max_context, 0, &p, err, sizeof err);
 *     dg_painter_check(p, &params, err, sizeof err);                   // at admission
 *     dg_painter_begin(p, &(dg_painter_job){...}, err, sizeof err);    // on <BOV>
 *     do step = dg_painter_step(p, err, sizeof err);                   // one per scheduler step
 *     while (step > 0 && step < params.steps);
 *     dg_painter_finish(p, &img, &hash, err, sizeof err);              // img is the caller's
 *     dg_painter_free(p);
 *
 * Every call takes the painter alone, never a sequence, so that painters drawing images of
 * one layout can be stepped together (below). Not thread-safe: one scheduler owns a painter.
 * Errors are negative DG_E* values with the message in err. */
#ifndef DG_PAINTER_H
#define DG_PAINTER_H

#include <stddef.h>
#include <stdint.h>

#include "cache/latent_cache.h"
#include "draw/connector.h"
#include "draw/dit.h"
#include "draw/vae.h"
#include "duogen.h"
#include "io/image.h"

typedef struct dg_painter dg_painter;

/* The VAE's state and the pixel buffer: used only inside dg_painter_begin and
 * dg_painter_finish, never between calls, so the painters one thread drives may share one
 * (a scheduler's slots do). The VAE's scratch at the picture's size is most of a painter's
 * memory: once a slot, 16 slots drawing 448x448 pictures of the shapes model held 0.9 GB.
 * Kept while it fits the next picture, else made for that one alone. Not thread-safe. */
typedef struct dg_painter_scratch dg_painter_scratch;
dg_painter_scratch *dg_painter_scratch_new(const dg_vae *vae, dg_backend *be);   /* NULL: out of memory */
void dg_painter_scratch_free(dg_painter_scratch *s);                             /* accepts NULL */

/* An earlier image of the conversation: a condition frame of the next one. */
typedef struct {
    const dg_image        *img;    /* borrowed: 8-bit RGB */
    const dg_image_digest *hash;   /* borrowed: its content hash, the latent cache key */
} dg_painter_cond;

/* One image to draw. Borrowed for dg_painter_begin. */
typedef struct {
    dg_cond_acc           *acc;      /* condition rows of at least positions [0, n_pos) */
    dg_cond_acc           *acc_neg;  /* the unconditional branch's rows: acc when NULL (the
                                        conversation's), or the negative prompt's
                                        (prompt_cond.h) */
    int                    n_pos;    /* conditional branch: positions [0, n_pos) of acc */
    int                    n_neg;    /* unconditional branch: positions [0, n_neg) of acc_neg
                                        (neither read when the image is not guided) */
    const dg_painter_cond *conds;    /* [n_conds] the earlier images, oldest first */
    int                    n_conds;
    dg_latent_cache       *lcache;   /* condition latents: looked up, and put when encoded */
    uint64_t               seed;     /* the job's seed */
    int                    index;    /* the image's index in the job (0-based): its noise */
    dg_image_params        params;   /* width, height, steps, guidance_scale, schedule,
                                        shift: every field a value (`set` is not read;
                                        checked by dg_painter_check) */
    float                  guided_above;   /* guidance runs for guidance_scale above this:
                                              0 (any scale > 0), or 1 for a published
                                              pipeline's package (its code guides only
                                              above 1: below, the conditional branch alone) */
} dg_painter_job;

/* What the image in progress has cost since dg_painter_begin; the caller adds it to its
 * timings and usage when the image ends. */
typedef struct {
    double  diffusion_ms;     /* begin (conditions, noise, layout) and the denoising steps */
    double  vae_ms;           /* encoding condition images (also inside diffusion_ms), decoding */
    int64_t cached_latents;   /* condition images whose latent came from the latent cache */
    int64_t dit_forwards;     /* DiT network evaluations: one per step, two with guidance
                                 (both in one forward) */
    int64_t nonfinite;        /* 1: the decoded picture held NaN or infinite values (drawn as
                                 0 there: black) */
} dg_painter_cost;

/* Pixels of a condition frame when the worker sets no bound (max_condition_pixels 0):
 * 1024², the full package's image size, 4096 DiT tokens per earlier image. */
#define DG_PAINTER_MAX_CONDITION_PIXELS (1024 * 1024)

/* A painter over the model's drawing components (borrowed; they outlive it), running on
 * `be` (borrowed: the scheduler's fork of the model's backend, engine/backend.h "Threads");
 * scratch: shared with other painters of this thread (dg_painter_scratch above; borrowed,
 * it must outlive the painter), or NULL for the painter's own.
 * max_context bounds the condition positions; max_condition_pixels bounds a condition
 * frame's pixels (0: DG_PAINTER_MAX_CONDITION_PIXELS; a frame keeps at least one patch).
 * DG_EINVAL for a negative bound; DG_ENOMEM. Buffers are allocated by the first begin. */
int  dg_painter_new(const dg_dit *dit, const dg_vae *vae, const dg_connector *conn, dg_backend *be,
                    dg_painter_scratch *scratch, int max_context, int64_t max_condition_pixels,
                    dg_painter **out, char *err, size_t errlen);
void dg_painter_free(dg_painter *p);   /* accepts NULL; drops an image in progress */

/* DG_EINVAL unless width and height are positive multiples of the VAE factor times the DiT
 * patch and steps is 1..DG_FLOW_MAX_STEPS. */
int  dg_painter_check(const dg_painter *p, const dg_image_params *params, char *err, size_t errlen);

/* Sets up the image: the semantic conditions, the condition frames (VAE-encoded or from
 * the latent cache), the target's noise, the DiT layout and the sampler. An image still in
 * progress is dropped. DG_ELIMIT beyond DG_DIT_MAX_FRAMES - 1 earlier images or the DiT's
 * position limits; DG_ENOMEM; DG_EINVAL for condition positions the accumulator lacks. */
int  dg_painter_begin(dg_painter *p, const dg_painter_job *job, char *err, size_t errlen);

/* 2 when the image in progress runs both branches of guidance, else 1. */
int  dg_painter_branches(const dg_painter *p);

/* One denoising step (two DiT forwards with guidance, one without). Returns the steps
 * taken so far, 1..steps: at `steps` the latent is ready for dg_painter_finish. */
int  dg_painter_step(dg_painter *p, char *err, size_t errlen);

/* Painters stepped together (docs/DESIGN.md §6 "Batching"). Images of one DiT layout (the
 * same frame sizes in the same order) may take their denoising step in one forward: for
 * each painter dg_painter_inputs gives the step's inputs (1, or 2 with guidance) and where
 * their velocities go; the caller runs dg_dit_forward_batch over all of them on a state of
 * its own with that layout installed; then dg_painter_advance on each, with its share of
 * the forward's time. On the CPU the image is the same bits as dg_painter_step's, which is
 * these three for one painter on its own state. */
const dg_dit_layout *dg_painter_layout(const dg_painter *p);   /* NULL: no image in progress */
int  dg_painter_inputs(dg_painter *p, dg_dit_input *in, float **velocity);   /* in[2], velocity[2] */
/* Guidance and the sampler's step from the velocities: as dg_painter_step returns. */
int  dg_painter_advance(dg_painter *p, double forward_ms, char *err, size_t errlen);

/* After the last step: the VAE decodes the latent into *out (a new image, the caller's)
 * and *hash gets its content hash. The painter then holds no image in progress. On error
 * *out is NULL. Nothing goes to the latent cache: as a later condition the image is
 * VAE-encoded from these pixels like any other (see "visual condition" above). */
int  dg_painter_finish(dg_painter *p, dg_image **out, dg_image_digest *hash, char *err, size_t errlen);

/* The cost of the image begun last (zero before any). */
void dg_painter_cost_get(const dg_painter *p, dg_painter_cost *out);

#endif

/* safetensors parsing (single, sharded, hostile headers), config.json variants and the
 * decoder's strict binding (shapes and missing tensors named in the error). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/package.h"
#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "dtype.h"
#include "duogen.h"
#include "mllm/qwen2.h"
#include "io/safetensors.h"

/* An in-memory safetensors image: header JSON + `data_len` bytes of 0..255. */
static uint8_t *image(const char *header, size_t data_len, size_t *size) {
    size_t h = strlen(header);
    uint8_t *b = malloc(8 + h + data_len + 1);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    for (size_t i = 0; i < data_len; i++) b[8 + h + i] = (uint8_t)i;
    *size = 8 + h + data_len;
    return b;
}

static int parse(const char *header, size_t data_len, char *err, size_t errlen) {
    size_t n;
    uint8_t *b = image(header, data_len, &n);
    dg_st *st;
    dg_st_new(&st);
    int rc = dg_st_add_buffer(st, b, n, "t.safetensors", err, errlen);
    dg_st_close(st);
    free(b);
    return rc;
}

TEST(parse_and_normalise_names) {
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
                    "\"model.language_model.layers.0.mlp.up_proj.weight\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
                    "\"model.visual.blocks.0.norm1.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]},"
                    "\"lm_head.weight\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[20,22]}}";
    size_t n;
    uint8_t *b = image(h, 22, &n);
    dg_st *st;
    char err[256];
    CHECK(dg_st_new(&st) == 0);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, n, "t", err, sizeof err), 0);
    CHECK_EQ_INT(dg_st_count(st), 3);
    const dg_st_tensor *t = dg_st_find(st, "model.layers.0.mlp.up_proj.weight");
    CHECK(t && t->dtype == DG_DTYPE_BF16 && t->n_dims == 2 && t->shape[1] == 3 && t->nbytes == 12);
    CHECK(t && t->data == b + n - 22);
    t = dg_st_find(st, "visual.blocks.0.norm1.weight");
    CHECK(t && t->dtype == DG_DTYPE_F32 && ((const uint8_t *)t->data)[0] == 12);
    CHECK(dg_st_find(st, "lm_head.weight") != NULL);
    CHECK(dg_st_find(st, "model.language_model.layers.0.mlp.up_proj.weight") == NULL);
    dg_st_close(st);
    free(b);
}

TEST(bad_headers_are_errors_naming_the_tensor) {
    char err[256];
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"BF16\",\"shape\":[4,4],\"data_offsets\":[0,32]}}", 16, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"w\"") && strstr(err, "truncated"));
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"BF16\",\"shape\":[4,4],\"data_offsets\":[0,30]}}", 32, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"w\"") && strstr(err, "[4, 4]") && strstr(err, "32 bytes"));
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"I8\"") != NULL);
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(parse("[1,2]", 0, err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(parse("{\"w\": ", 0, err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(parse("{\"model.a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"model.language_model.a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       8, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "twice") != NULL);
    /* shapes whose element count wraps 2^64 to 0 (with data_offsets of 0 bytes to match):
     * refused before the product, not taken as empty */
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1099511627776,16777216],\"data_offsets\":[0,0]}}", 0, err,
                       sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"w\"") && strstr(err, "shape too large"));
    CHECK_EQ_INT(parse("{\"w\":{\"dtype\":\"F32\",\"shape\":[1073741824,1024,1073741824],\"data_offsets\":[0,0]}}", 0,
                       err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "shape too large") != NULL);
    /* two tensors over the same bytes, or overlapping ones: refused, naming both (the
     * layout rewrite blocked such bytes twice) */
    CHECK_EQ_INT(parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "\"a\"") && strstr(err, "\"b\"") && strstr(err, "overlap"));
    CHECK_EQ_INT(parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "overlap") != NULL);
    /* adjacent, and an empty tensor anywhere: fine */
    CHECK_EQ_INT(parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                       "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}", 24, err, sizeof err),
                 0);
    /* bytes after the last tensor's data: refused as the reference library refuses them
     * (MetadataIncompleteBuffer); they were copied into memory with the weights */
    CHECK_EQ_INT(parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 17, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "1 bytes after the last tensor's data") != NULL);
    CHECK_EQ_INT(parse("{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 4, err, sizeof err),
                 DG_EMODEL);
    CHECK_EQ_INT(parse("{}", 0, err, sizeof err), 0);
    /* a header length past the end of the file */
    uint8_t b[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    dg_st *st;
    dg_st_new(&st);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, sizeof b, "t", err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, 5, "t", err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(dg_st_count(st), 0);
    dg_st_close(st);
}

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(data, 1, n, f) == n);
    if (f) fclose(f);
}

TEST(single_file_and_sharded_index) {
    char dir[] = "/tmp/dg_test_st_XXXXXX", path[256], err[256];
    CHECK(mkdtemp(dir) != NULL);
    size_t n1, n2;
    uint8_t *a = image("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, &n1);
    uint8_t *b = image("{\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, &n2);
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", dir);
    write_file(path, a, n1);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    write_file(path, b, n2);
    const char *idx = "{\"metadata\":{},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                      "\"b\":\"model-00002-of-00002.safetensors\"}}";
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_file(path, idx, strlen(idx));
    dg_st *st;
    CHECK_EQ_INT(dg_st_open(dir, &st, err, sizeof err), 0);
    CHECK(st && dg_st_find(st, "a") && dg_st_find(st, "b"));
    dg_st_close(st);
    /* an index naming a tensor its shard lacks */
    const char *bad = "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                      "\"c\":\"model-00001-of-00002.safetensors\"}}";
    write_file(path, bad, strlen(bad));
    CHECK_EQ_INT(dg_st_open(dir, &st, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"c\"") != NULL);
    /* a single file, and a truncated one */
    snprintf(path, sizeof path, "%s/one.safetensors", dir);
    write_file(path, a, n1);
    CHECK_EQ_INT(dg_st_open(path, &st, err, sizeof err), 0);
    dg_st_close(st);
    write_file(path, a, n1 - 3);
    CHECK_EQ_INT(dg_st_open(path, &st, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"a\"") != NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(a);
    free(b);
}

static int ticks;
static double last_tick;
static void count_tick(void *user, double done) {
    (void)user;
    ticks++;
    last_tick = done;
}

/* DG_ST_HUGEPAGES: the file read into huge-page memory gives the same tensors, byte for byte,
 * as its memory map, and the same errors; where the kernel offers transparent huge pages the
 * copy starts within a line of a 2 MiB boundary (that is what the flag is for) and its data
 * section on a 64-byte line (the header here is not a multiple of 64 long). */
TEST(huge_page_copy_equals_the_map) {
    char dir[] = "/tmp/dg_test_st_XXXXXX", path[256], err[256];
    CHECK(mkdtemp(dir) != NULL);
    const char *header = "{\"w\":{\"dtype\":\"BF16\",\"shape\":[1536,1024],\"data_offsets\":[0,3145728]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[3145728,3145740]}}";
    size_t n;
    uint8_t *img = image(header, 3145740, &n);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_file(path, img, n);
    dg_st *mapped = NULL, *huge = NULL;
    CHECK_EQ_INT(dg_st_open(dir, &mapped, err, sizeof err), 0);
    CHECK_EQ_INT(dg_st_open_flags(dir, DG_ST_HUGEPAGES, count_tick, NULL, &huge, err, sizeof err), 0);
    CHECK(mapped && huge && dg_st_count(mapped) == 2 && dg_st_count(huge) == 2);
    for (size_t i = 0; mapped && huge && i < dg_st_count(mapped); i++) {
        const dg_st_tensor *a = dg_st_at(mapped, i), *b = dg_st_at(huge, i);
        CHECK(!strcmp(a->name, b->name) && a->dtype == b->dtype && a->nbytes == b->nbytes);
        CHECK(memcmp(a->data, b->data, a->nbytes) == 0);
    }
    char line[128] = "";
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f) {
        if (!fgets(line, sizeof line, f)) line[0] = 0;
        fclose(f);
    }
    if (huge && line[0] && !strstr(line, "[never]")) {
        const dg_st_tensor *w = dg_st_find(huge, "w");
        const uintptr_t start = (uintptr_t)w->data - 8 - strlen(header);   /* the file's first byte */
        CHECK((8 + strlen(header)) % 64 != 0);
        CHECK((uintptr_t)w->data % 64 == 0);
        CHECK(start % ((uintptr_t)2 << 20) < 64);
        CHECK(w->data != dg_st_find(mapped, "w")->data);
        CHECK(ticks == 1 && last_tick == 1.0);   /* one file of 3 MiB: only its end */
    }
    dg_st_close(mapped);
    dg_st_close(huge);
    /* a truncated file: the same error either way */
    write_file(path, img, n - 5);
    char err2[256];
    CHECK_EQ_INT(dg_st_open(dir, &mapped, err, sizeof err), DG_EMODEL);
    CHECK_EQ_INT(dg_st_open_flags(dir, DG_ST_HUGEPAGES, NULL, NULL, &huge, err2, sizeof err2), DG_EMODEL);
    CHECK(!strcmp(err, err2) && strstr(err, "\"b\"") != NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(img);
}

TEST(config_layout_variants) {
    dg_qwen2vl_config c;
    char err[256];
    const char *flat = "{\"hidden_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                       "\"num_key_value_heads\":2,\"intermediate_size\":128,\"vocab_size\":320,"
                       "\"rms_norm_eps\":1e-6,\"rope_theta\":1000000.0,\"tie_word_embeddings\":true,"
                       "\"rope_scaling\":{\"type\":\"mrope\",\"mrope_section\":[2,3,3]},"
                       "\"eos_token_id\":[7,8],\"vision_config\":{\"depth\":2,\"hidden_size\":32,\"num_heads\":2}}";
    CHECK_EQ_INT(dg_config_parse(flat, strlen(flat), "c", &c, err, sizeof err), 0);
    CHECK(c.text.head_dim == 16 && c.text.mrope_section[1] == 3 && c.text.tie_word_embeddings);
    CHECK(c.text.n_eos == 2 && c.text.eos_token_id[1] == 8);
    CHECK(c.vision.depth == 2 && c.vision.intermediate_size == 3420 && c.vision.tokens_per_second == 2);
    /* transformers 4.53+: nested text_config wins; v5: rope_parameters */
    const char *nested = "{\"text_config\":{\"hidden_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                         "\"intermediate_size\":128,\"vocab_size\":320,"
                         "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":5000.0,\"mrope_section\":[4,2,2]}},"
                         "\"hidden_size\":999}";
    CHECK_EQ_INT(dg_config_parse(nested, strlen(nested), "c", &c, err, sizeof err), 0);
    CHECK(c.text.hidden_size == 64 && c.text.n_kv_heads == 4 && c.text.rope_theta == 5000.0f);
    CHECK(c.text.mrope_section[0] == 4 && c.text.rms_norm_eps == 1e-5f);   /* absent: Qwen2_5_VLTextConfig's */
    const char *bad = "{\"hidden_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                      "\"intermediate_size\":128,\"vocab_size\":320,\"rope_scaling\":{\"mrope_section\":[2,3,4]}}";
    CHECK_EQ_INT(dg_config_parse(bad, strlen(bad), "c", &c, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "mrope_section") != NULL);
    const char *missing = "{\"hidden_size\":64}";
    CHECK_EQ_INT(dg_config_parse(missing, strlen(missing), "c", &c, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "num_hidden_layers") != NULL);
}

/* The published Qwen2.5-VL config.json (docs/specs/qwen2_5_vl.md §1.1: the 7B file as
 * transformers 4.41.2 wrote it; the 3B one differs in sizes, tying, and max_window_layers 70
 * over 36 layers with the window off), and the same re-saved by transformers 4.49+ (the
 * rope block's types "default"): everything the parser checks opens. */
TEST(published_qwen_configs_parse) {
    static const char *const published =
        "{\"architectures\":[\"Qwen2_5_VLForConditionalGeneration\"],\"attention_dropout\":0.0,"
        "\"bos_token_id\":151643,\"eos_token_id\":151645,\"vision_start_token_id\":151652,"
        "\"vision_end_token_id\":151653,\"vision_token_id\":151654,\"image_token_id\":151655,"
        "\"video_token_id\":151656,\"hidden_act\":\"silu\",\"hidden_size\":%d,\"initializer_range\":0.02,"
        "\"intermediate_size\":%d,\"max_position_embeddings\":128000,\"max_window_layers\":%d,"
        "\"model_type\":\"qwen2_5_vl\",\"num_attention_heads\":%d,\"num_hidden_layers\":%d,"
        "\"num_key_value_heads\":%d,\"rms_norm_eps\":1e-06,\"rope_theta\":1000000.0,\"sliding_window\":32768,"
        "\"tie_word_embeddings\":%s,\"torch_dtype\":\"bfloat16\",\"transformers_version\":\"4.41.2\","
        "\"use_cache\":true,\"use_sliding_window\":false,"
        "\"vision_config\":{\"depth\":32,\"hidden_act\":\"silu\",\"hidden_size\":1280,\"intermediate_size\":3420,"
        "\"num_heads\":16,\"in_chans\":3,\"out_hidden_size\":%d,\"patch_size\":14,\"spatial_merge_size\":2,"
        "\"spatial_patch_size\":14,\"window_size\":112,\"fullatt_block_indexes\":[7,15,23,31],"
        "\"tokens_per_second\":2,\"temporal_patch_size\":2},"
        "\"rope_scaling\":{%s,\"mrope_section\":[16,24,24]},\"vocab_size\":%d}";
    static const struct { int d, f, window, heads, layers, kv; const char *tie; int vocab; } sizes[] = {
        {3584, 18944, 28, 28, 28, 4, "false", 152064}, {2048, 11008, 70, 16, 36, 2, "true", 151936}};
    static const char *const ropes[] = {"\"type\":\"mrope\"", "\"rope_type\":\"default\",\"type\":\"default\""};
    for (int i = 0; i < 2; i++)
        for (int r = 0; r < 2; r++) {
            char json[2048], err[256];
            dg_qwen2vl_config c;
            snprintf(json, sizeof json, published, sizes[i].d, sizes[i].f, sizes[i].window, sizes[i].heads,
                     sizes[i].layers, sizes[i].kv, sizes[i].tie, sizes[i].d, ropes[r], sizes[i].vocab);
            if (dg_config_parse(json, strlen(json), "c", &c, err, sizeof err) < 0) {
                test_fail(__FILE__, __LINE__, "%d layers, rope %s: %s", sizes[i].layers, ropes[r], err);
                continue;
            }
            CHECK(c.text.mrope_section[0] == 16 && c.text.mrope_section[2] == 24 && c.text.rope_theta == 1e6f);
            CHECK(c.text.rms_norm_eps == 1e-6f && c.text.n_eos == 1 && c.text.eos_token_id[0] == 151645);
            CHECK(c.vision.n_fullatt == 4 && c.vision.fullatt_block_indexes[3] == 31);
        }
}

/* The decoder's binding on a real package (mkmodel, own vocabulary) with a config that
 * disagrees with the weights. */
TEST(binding_names_tensor_expected_and_found) {
    char dir[] = "/tmp/dg_test_bind_XXXXXX", cmd[300], pkg[300], err[512];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(cmd, sizeof cmd, "%s/mkmodel --preset tiny --seed 3 --vocab own --out %s >/dev/null",
             test_build_dir(), dir);
    if (system(cmd) != 0) { CHECK(!"mkmodel"); return; }
    snprintf(pkg, sizeof pkg, "%s/mllm", dir);
    dg_qwen2vl_config c;
    dg_backend *be;
    dg_st *st;
    dg_qwen2 m;
    CHECK_EQ_INT(dg_config_load(pkg, &c, err, sizeof err), 0);
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    CHECK_EQ_INT(dg_st_open(pkg, &st, err, sizeof err), 0);
    CHECK_EQ_INT(dg_qwen2_load(&m, &c.text, st, be, err, sizeof err), 0);
    dg_qwen2_unload(&m);
    dg_text_config t = c.text;
    t.intermediate_size = 100;
    char want[512];
    CHECK_EQ_INT(dg_qwen2_load(&m, &t, st, be, err, sizeof err), DG_EMODEL);
    snprintf(want, sizeof want, "%s: tensor \"model.layers.0.mlp.gate_proj.weight\": expected shape [100, 64], "
             "found [128, 64]", pkg);
    CHECK_EQ_STR(err, want);
    t = c.text;
    t.tie_word_embeddings = 0;
    CHECK_EQ_INT(dg_qwen2_load(&m, &t, st, be, err, sizeof err), DG_EMODEL);
    snprintf(want, sizeof want, "%s: tensor \"lm_head.weight\": missing from the checkpoint", pkg);   /* which component */
    CHECK_EQ_STR(err, want);
    dg_st_close(st);
    dg_backend_free(be);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}

/* mkmodel --seeded: headers without data, filled from the seed at load; refused unless
 * DG_SEEDED_WEIGHTS=1, so that a worker never runs such a package by accident. */
TEST(seeded_files_need_the_environment_and_fill_from_the_seed) {
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\",\"duogen.seeded\":\"5\"},"
                      "\"m\":{\"dtype\":\"BF16\",\"shape\":[64,32],\"data_offsets\":[0,4096]},"
                      "\"v\":{\"dtype\":\"F32\",\"shape\":[32],\"data_offsets\":[4096,4224]}}";
    char err[512];
    size_t n;
    uint8_t *b = image(hdr, 0, &n);
    dg_st *st;
    unsetenv("DG_SEEDED_WEIGHTS");
    dg_st_new(&st);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, n, "s.safetensors", err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "s.safetensors") && strstr(err, "DG_SEEDED_WEIGHTS=1"));
    CHECK_EQ_INT(dg_st_count(st), 0);
    dg_st_close(st);

    setenv("DG_SEEDED_WEIGHTS", "1", 1);
    dg_st *st2;
    dg_st_new(&st);
    dg_st_new(&st2);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, n, "s.safetensors", err, sizeof err), 0);
    CHECK_EQ_INT(dg_st_add_buffer(st2, b, n, "s.safetensors", err, sizeof err), 0);
    CHECK(dg_st_seeded(st) && dg_st_seeded(st2));
    const dg_st_tensor *m = dg_st_find(st, "m"), *v = dg_st_find(st, "v");
    CHECK(m && v && m->data && v->data && m->nbytes == 4096 && v->nbytes == 128);
    /* the same seed gives the same values; matrices ~ U(±0.035) (std 0.02), vectors 1 ± 0.175 */
    CHECK(memcmp(m->data, dg_st_find(st2, "m")->data, 4096) == 0);
    double sum = 0, sq = 0, vmin = 1e9, vmax = -1e9;
    for (int i = 0; i < 2048; i++) {
        const float x = dg_bf16_to_f32(((const uint16_t *)m->data)[i]);
        sum += x;
        sq += (double)x * x;
    }
    CHECK_NEAR(sum / 2048, 0.0, 0.003);          /* 4.4 standard errors of the mean */
    CHECK_NEAR(sqrt(sq / 2048), 0.02, 0.002);
    for (int i = 0; i < 32; i++) {
        const float x = ((const float *)v->data)[i];
        vmin = x < vmin ? x : vmin;
        vmax = x > vmax ? x : vmax;
    }
    CHECK(vmin >= 0.82 && vmax <= 1.18 && vmax > vmin);
    dg_st_close(st);
    dg_st_close(st2);
    free(b);

    /* another seed, other values; F16 and a wrong byte count are still errors */
    const char *other = "{\"__metadata__\":{\"duogen.seeded\":\"6\"},"
                        "\"m\":{\"dtype\":\"BF16\",\"shape\":[64,32],\"data_offsets\":[0,4096]}}";
    b = image(other, 0, &n);
    dg_st_new(&st);
    CHECK_EQ_INT(dg_st_add_buffer(st, b, n, "o.safetensors", err, sizeof err), 0);
    uint8_t *b5 = image(hdr, 0, &n);
    dg_st_new(&st2);
    CHECK_EQ_INT(dg_st_add_buffer(st2, b5, n, "s.safetensors", err, sizeof err), 0);
    CHECK(memcmp(dg_st_find(st, "m")->data, dg_st_find(st2, "m")->data, 4096) != 0);
    dg_st_close(st);
    dg_st_close(st2);
    free(b);
    free(b5);
    CHECK_EQ_INT(parse("{\"__metadata__\":{\"duogen.seeded\":\"1\"},"
                       "\"h\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 0, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "\"h\"") && strstr(err, "F16"));
    CHECK_EQ_INT(parse("{\"__metadata__\":{\"duogen.seeded\":\"1\"},"
                       "\"w\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,6]}}", 0, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "\"w\"") != NULL);
    unsetenv("DG_SEEDED_WEIGHTS");
}

typedef struct {
    int finished, images;
    size_t png_len;
} seeded_obs;

static void seeded_text(void *u, const char *d, size_t n) { (void)u; (void)d; (void)n; }
static void seeded_started(void *u, int i, int w, int h, int steps) { (void)u; (void)i; (void)w; (void)h; (void)steps; }
static void seeded_step(void *u, int i, int step, int steps) { (void)u; (void)i; (void)step; (void)steps; }
static void seeded_done(void *u, int i, int w, int h, const uint8_t *png, size_t len) {
    seeded_obs *o = u;
    (void)i; (void)png;
    if (w == 32 && h == 32) o->images++;
    o->png_len = len;
}
static void seeded_finished(void *u, dg_finish_reason r, const dg_usage *us, const dg_timings *t) {
    (void)r; (void)us; (void)t;
    ((seeded_obs *)u)->finished++;
}
static void seeded_failed(void *u, int code, const char *msg) {
    (void)u;
    printf("  failed: %s: %s\n", dg_error_name(code), msg);
}

/* A whole seeded package (mkmodel --preset tiny --seeded) opens with the variable set, says
 * so in its description, and draws an image on the CPU; without it, the open names the file. */
TEST(seeded_package_opens_only_when_allowed_and_runs) {
    char dir[] = "/tmp/dg_test_seeded_XXXXXX", cmd[300], err[512];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(cmd, sizeof cmd, "%s/mkmodel --preset tiny --seed 2 --seeded --vocab own --out %s >/dev/null",
             test_build_dir(), dir);
    if (system(cmd) != 0) { CHECK(!"mkmodel"); return; }
    dg_model *mod = NULL;
    unsetenv("DG_SEEDED_WEIGHTS");
    CHECK_EQ_INT(dg_model_open(dir, &(dg_model_opts){.device = "cpu", .threads = 1}, &mod, err, sizeof err),
                 DG_EMODEL);
    CHECK(strstr(err, "model.safetensors") && strstr(err, "DG_SEEDED_WEIGHTS"));
    setenv("DG_SEEDED_WEIGHTS", "1", 1);
    CHECK_EQ_INT(dg_model_open(dir, &(dg_model_opts){.device = "cpu", .threads = 1}, &mod, err, sizeof err), 0);
    if (!mod) { printf("  %s\n", err); return; }
    CHECK(strstr(dg_model_describe(mod), "SEEDED") != NULL);
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(mod, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    dg_part part = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    seeded_obs o = {0};
    dg_logit_bias bias = {test_bov_id(dir), 100.0f};   /* random weights never choose <BOV> */
    CHECK(bias.token > 0);
    dg_request r = {.id = "seeded", .messages = &msg, .n_messages = 1, .seed = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 3, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                     DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 2, .guidance_scale = 2.0f, .max_images = 1}};
    dg_sink sink = {.user = &o, .text = seeded_text, .image_started = seeded_started, .step = seeded_step,
                    .image_done = seeded_done, .finished = seeded_finished, .failed = seeded_failed};
    uint64_t seq;
    CHECK_EQ_INT(dg_sched_submit(s, &r, &sink, &seq, err, sizeof err), 0);
    while (dg_sched_active(s) > 0) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
    CHECK_EQ_INT(o.finished, 1);
    CHECK_EQ_INT(o.images, 1);
    CHECK(o.png_len > 8);
    dg_sched_free(s);
    dg_model_close(mod);
    unsetenv("DG_SEEDED_WEIGHTS");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}

int main(void) { return test_main(); }

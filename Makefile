# duogen — the one build entry.
#
#   make            build/duogend, build/duogenctl, build/libduogen.a, tools, tests, and the
#                   manual pages build/man/duogend.8, duogend.conf.5, duogenctl.1
#   make deps       install the Debian packages the build and the tests need (when missing)
#   make test       build everything and run every test (T=name: only those matching);
#                   the last line is "N passed, N failed, N skipped"
#   make bench      benchmarks; figures on stdout, JSON under build/bench/
#   make fuzz       every fuzz target for a bounded time (clang + libFuzzer)
#   make alloc-asan tests/test_alloc_fail over the engine built with ASan and UBSan (~11 min;
#                   the test's own check of leaks stands in for LeakSanitizer's)
#   make sanitize   every unit test (but test_alloc_fail) and integration test over the tree
#                   built with ASan, LeakSanitizer and UBSan in build/asan (tools/sanitize.sh)
#   make tsan       test_sched_threads and the integration tests over the tree built with
#                   ThreadSanitizer in build/tsan (the worker's threads)
#   make soak       10,000 jobs through 3 workers while workers are SIGKILLed and Redis restarts
#                   twice (tools/soak/soak.py, ~5 min; not in `make test`): jobs lost, doubled,
#                   dead, worker RSS and Redis memory; JSON in build/bench/soak.json
#   make systemd-check  duogend@0 under systemd in a booted container: READY, restart after
#                   kill -9, the watchdog, drain on stop, start at boot when enabled
#                   (tools/systemd/nspawn-check.sh)
#   make demo       the demo jobs on the shipped shapes model (tools/train/shapes; tools/demo.sh)
#   make train-shapes   train the shapes model into tools/train/shapes (hours on a CPU; TRAIN_DEVICE=cuda for a GPU; eval-shapes scores it)
#   make install    PREFIX=/usr/local DESTDIR=
#
# Where sources live decides what they become, so a new unit needs no Makefile edit:
#   engine/*.c engine/*/*.c kernels/cpu/*.c
#                               -> build/libduogen.a          (the engine; no Redis, no protobuf)
#   kernels/cuda/*.cu           -> build/libduogen_cuda.so    (the CUDA backend, when nvcc is
#                                                              on PATH; loaded at run time)
#   daemon/*.c                  -> build/duogend              (links libduogen)
#   tools/<name>/*.c            -> build/<name>               (links libduogen and the protocol)
#   tests/test_*.c              -> build/tests/test_*         (one unit-test program each)
#   tests/fuzz_*.c              -> build/fuzz/fuzz_*          (libFuzzer targets, `make fuzz`)
#   tests/engine_fake/*.c       -> build/tests/duogend-fake   (duogend over the test engine;
#                                                              never installed)
#   examples/producers/         -> build/producers/           (the C producer; the Go one when
#                                                              Debian's Go packages are there)

CC      ?= cc
PREFIX  ?= /usr/local
DESTDIR ?=
BUILD   := build
.DEFAULT_GOAL := all

OPENBLAS_INC := /usr/include/x86_64-linux-gnu/openblas-openmp
OPENBLAS_LIB := /usr/lib/x86_64-linux-gnu/openblas-openmp

PKGS      := hiredis libprotobuf-c libpng libsystemd libpcre2-8 libutf8proc jansson libturbojpeg libjpeg zlib openssl
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

WARN     := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wno-missing-braces -Wno-format-truncation
CFLAGS   ?= -O2 -g
CFLAGS   += -std=c11 -D_GNU_SOURCE -fPIC -fopenmp $(WARN) -MMD -MP \
            -Iengine -Ikernels -I$(BUILD)/gen -I$(OPENBLAS_INC) $(PKG_CFLAGS)
LDLIBS   += $(PKG_LIBS) -L$(OPENBLAS_LIB) -Wl,-rpath,$(OPENBLAS_LIB) -lopenblas -fopenmp -lpthread -lm -ldl

PROTO_C  := $(BUILD)/gen/duogen.pb-c.c
PROTO_H  := $(BUILD)/gen/duogen.pb-c.h
PROTO_PY := $(BUILD)/gen/python/duogen_pb2.py

ENGINE_SRC := $(wildcard engine/*.c engine/*/*.c kernels/cpu/*.c)
ENGINE_OBJ := $(ENGINE_SRC:%.c=$(BUILD)/obj/%.o)
LIB        := $(BUILD)/libduogen.a

# ---- the CUDA backend: kernels/cuda/*.cu become build/libduogen_cuda.so when nvcc is on PATH
# (sm_90 machine code for the H100/H200 plus compute_80 PTX that other GPUs, Ampere on,
# JIT-compile).
# engine/backend.c loads that module on the first "cuda:N", so a process that never asks for
# a GPU does not map the CUDA libraries; without nvcc the build is the CPU-only product, and
# "cuda:N" says so at run time.
NVCC := $(shell command -v nvcc 2>/dev/null)
# The interface between the core and the module is the dg_backend of these headers: both are
# built with a hash of them, and the core refuses a module of another build (a new duogend
# beside an old libduogen_cuda.so: calls into a struct of another layout).
BACKEND_ABI := $(shell cat engine/backend.h engine/dtype.h engine/duogen.h kernels/cuda/cuda_backend.h | sha256sum | cut -c1-16)
$(BUILD)/obj/engine/backend.o: CFLAGS += -DDG_BACKEND_ABI='"$(BACKEND_ABI)"'
$(BUILD)/obj/kernels/cuda/cuda_backend.o: NVCCFLAGS += -DDG_BACKEND_ABI='"$(BACKEND_ABI)"'
# a module of another build, for test_backend_cpu's refusal of it
FAKE_CUDA_MODULE := $(BUILD)/tests/fake_cuda_module.so
$(FAKE_CUDA_MODULE): tests/fake_cuda_module.c
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	@$(CC) -shared -fPIC -O1 -Wall -Werror -DDG_BACKEND_ABI='"another-build"' -o $@ $<
ifneq ($(NVCC),)
CUDA_LIB   := $(abspath $(dir $(NVCC))../lib64)
CUDA_ARCH  ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80
NVCCFLAGS  ?= -O3
NVCCFLAGS  += -std=c++17 $(CUDA_ARCH) -Iengine -Ikernels --Werror all-warnings \
              -Xcompiler -fPIC,-Wall,-Wextra,-Wno-unused-parameter
CUDA_OBJ   := $(patsubst %.cu,$(BUILD)/obj/%.o,$(wildcard kernels/cuda/*.cu))
CUDA_MODULE := $(BUILD)/libduogen_cuda.so
$(CUDA_MODULE): $(CUDA_OBJ)
	@echo "  LD      $@"
	@$(CXX) -shared -o $@ $^ -L$(CUDA_LIB) -Wl,-rpath,$(CUDA_LIB) -lcublasLt -lcublas -lcudart
$(BUILD)/obj/engine/backend.o: CFLAGS += -DDG_HAVE_CUDA
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	@echo "  NVCC    $<"
	@$(NVCC) $(NVCCFLAGS) -MMD -MP -MF $(@:.o=.d) -c $< -o $@
endif

DAEMON_SRC := $(wildcard daemon/*.c)
DAEMON_OBJ := $(DAEMON_SRC:%.c=$(BUILD)/obj/%.o)
# duogend's objects without its main(), shared with the test build of the daemon
DAEMON_LIB_OBJ := $(filter-out $(BUILD)/obj/daemon/main.o,$(DAEMON_OBJ))
PROTO_OBJ  := $(BUILD)/obj/gen/duogen.pb-c.o

TOOLS      := $(notdir $(patsubst %/,%,$(sort $(dir $(wildcard tools/*/*.c)))))
TOOL_BINS  := $(TOOLS:%=$(BUILD)/%)

TEST_SRC   := $(wildcard tests/test_*.c)
TEST_BINS  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON_SRC := $(wildcard tests/common/*.c)
TEST_COMMON_OBJ := $(TEST_COMMON_SRC:%.c=$(BUILD)/obj/%.o)
# named here, or make takes these objects (which only pattern rules name) for intermediate
# files, deletes them after the first link, and the next make builds every test again
.SECONDARY: $(TEST_SRC:%.c=$(BUILD)/obj/%.o) $(TEST_COMMON_OBJ)
FAKE_SRC   := $(wildcard tests/engine_fake/*.c)
FAKE_OBJ   := $(FAKE_SRC:%.c=$(BUILD)/obj/%.o)
FAKE_BIN   := $(if $(FAKE_SRC),$(BUILD)/tests/duogend-fake)

FUZZ_SRC   := $(wildcard tests/fuzz_*.c)
FUZZ_BINS  := $(FUZZ_SRC:tests/%.c=$(BUILD)/fuzz/%)

# ---- example producers (examples/producers/README.md): the C one is always built; the Go one
# when Debian's Go toolchain and packages are installed (golang-go, protoc-gen-go,
# golang-github-gomodule-redigo-dev, golang-google-protobuf-dev), in GOPATH mode over
# /usr/share/gocode with modules and the proxy off, so nothing is downloaded, and without
# cgo (a static binary: $(CC), sanitizers and all in tools/sanitize.sh's builds, never
# reaches it; with them, cgo's resolver crashed it); the Ruby one needs only its generated
# protocol code
GOCODE        := /usr/share/gocode
GO            := $(shell command -v go 2>/dev/null)
PROTOC_GEN_GO := $(shell command -v protoc-gen-go 2>/dev/null)
GO_READY      := $(and $(GO),$(PROTOC_GEN_GO),$(wildcard $(GOCODE)/src/github.com/gomodule/redigo/redis),$(wildcard $(GOCODE)/src/google.golang.org/protobuf/proto))
GO_ENV        := GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOPATH=$(abspath $(BUILD)/go):$(GOCODE) GOCACHE=$(abspath $(BUILD)/go/cache)
PROTO_RB      := $(BUILD)/gen/ruby/duogen_pb.rb
PROTO_GO      := $(BUILD)/go/src/duogen/pb/duogen.pb.go
PRODUCERS     := $(BUILD)/producers/c-producer $(PROTO_RB) $(if $(GO_READY),$(BUILD)/producers/go-producer)

ALL_BINS := $(BUILD)/duogend $(TOOL_BINS) $(TEST_BINS) $(FAKE_BIN) $(PROTO_PY) $(CUDA_MODULE) $(FAKE_CUDA_MODULE) \
            $(PRODUCERS)

# ---- manual pages: each program writes its own (hidden --man) from the tables of its --help
# (daemon/manpage.h), so that the pages and the code cannot drift
MAN_PAGES := $(BUILD)/man/duogend.8 $(BUILD)/man/duogend.conf.5 $(BUILD)/man/duogenctl.1
$(BUILD)/man/duogend.8: $(BUILD)/duogend
	@mkdir -p $(dir $@)
	@echo "  MAN     $@"
	@$< --man 8 > $@.tmp && mv $@.tmp $@
$(BUILD)/man/duogend.conf.5: $(BUILD)/duogend
	@mkdir -p $(dir $@)
	@echo "  MAN     $@"
	@$< --man 5 > $@.tmp && mv $@.tmp $@
$(BUILD)/man/duogenctl.1: $(BUILD)/duogenctl
	@mkdir -p $(dir $@)
	@echo "  MAN     $@"
	@$< --man > $@.tmp && mv $@.tmp $@

.PHONY: all deps test alloc-asan sanitize tsan soak systemd-check bench bench-queue bench-tokenizer bench-decoder bench-drafts bench-batch bench-vision bench-image bench-e2e fuzz demo install uninstall clean \
        train-shapes eval-shapes
all: $(LIB) $(ALL_BINS) $(MAN_PAGES)

# ---- protocol: generated at build time, never committed -------------------------------
$(PROTO_C) $(PROTO_H): proto/duogen.proto
	@mkdir -p $(BUILD)/gen
	protoc-c --proto_path=proto --c_out=$(BUILD)/gen proto/duogen.proto

$(PROTO_PY): proto/duogen.proto
	@mkdir -p $(BUILD)/gen/python
	protoc --proto_path=proto --python_out=$(BUILD)/gen/python proto/duogen.proto

$(PROTO_RB): proto/duogen.proto
	@mkdir -p $(dir $@)
	protoc --proto_path=proto --ruby_out=$(dir $@) proto/duogen.proto

# the Go package duogen/pb under build/go (a GOPATH of its own beside Debian's)
$(PROTO_GO): proto/duogen.proto
	@mkdir -p $(dir $@)
	protoc --proto_path=proto --go_out=$(dir $@) --go_opt=paths=source_relative \
	       --go_opt=Mduogen.proto=duogen/pb proto/duogen.proto

$(PROTO_OBJ): $(PROTO_C)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Wno-unused-parameter -c $< -o $@

# every object may include the generated header: build it first
$(BUILD)/obj/%.o: %.c | $(PROTO_H)
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(CFLAGS) -c $< -o $@

# ---- the engine library ----------------------------------------------------------------
$(LIB): $(ENGINE_OBJ)
	@mkdir -p $(dir $@)
	@echo "  AR      $@"
	@rm -f $@ && ar rcs $@ $^

# ---- the worker ----------------------------------------------------------------------
$(BUILD)/duogend: $(DAEMON_OBJ) $(PROTO_OBJ) $(LIB)
	@echo "  LD      $@"
	@$(CC) $(CFLAGS) -o $@ $(DAEMON_OBJ) $(PROTO_OBJ) $(LIB) $(LDLIBS)

$(FAKE_BIN): $(BUILD)/obj/daemon/main.o $(DAEMON_LIB_OBJ) $(FAKE_OBJ) $(BUILD)/obj/engine/error.o $(PROTO_OBJ)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

# ---- tools: one binary per folder ------------------------------------------------------
define tool_rule
$(BUILD)/$(1): $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard tools/$(1)/*.c)) $(PROTO_OBJ) $(LIB)
	@echo "  LD      $$@"
	@$$(CC) $$(CFLAGS) -o $$@ $$^ $$(LDLIBS)
endef
$(foreach t,$(TOOLS),$(eval $(call tool_rule,$(t))))
# the chat template's bytes are in chat_template.o (.incbin)
$(BUILD)/obj/tools/mkmodel/chat_template.o: tools/mkmodel/chat_template.jinja
# duogenctl speaks Redis through the daemon's connection code (URL, password, TLS, reconnects),
# checks job ids by the workers' rule (job.c) and writes its manual page with manpage.c
$(BUILD)/duogenctl: $(BUILD)/obj/daemon/redis.o $(BUILD)/obj/daemon/tls.o $(BUILD)/obj/daemon/log.o \
                   $(BUILD)/obj/daemon/daemon_config.o $(BUILD)/obj/daemon/manpage.o $(BUILD)/obj/daemon/job.o \
                   $(BUILD)/obj/daemon/outdir.o
# result --html renders the answer's Markdown with cmark (tools/duogenctl/html.c)
$(BUILD)/duogenctl: LDLIBS += $(shell pkg-config --libs libcmark 2>/dev/null)
$(BUILD)/obj/tools/duogenctl/html.o: CFLAGS += $(shell pkg-config --cflags libcmark 2>/dev/null)

# ---- example producers -------------------------------------------------------------------
$(BUILD)/producers/c-producer: $(BUILD)/obj/examples/producers/c/producer.o $(PROTO_OBJ)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/producers/go-producer: examples/producers/go/main.go $(PROTO_GO)
	@mkdir -p $(dir $@)
	@echo "  GO      $@"
	@$(GO_ENV) go build -o $@ $<

# ---- unit tests ----------------------------------------------------------------------
$(BUILD)/tests/test_%: $(BUILD)/obj/tests/test_%.o $(TEST_COMMON_OBJ) $(PROTO_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

# the allocation-failure test counts and fails the engine's own allocations (tests/test_alloc_fail.c)
ALLOC_WRAP := -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=free \
              -Wl,--wrap=posix_memalign,--wrap=strdup,--wrap=strndup
$(BUILD)/tests/test_alloc_fail: LDLIBS += $(ALLOC_WRAP)

# tests of the daemon's own units link its objects (without main)
$(BUILD)/tests/test_daemon_%: $(BUILD)/obj/tests/test_daemon_%.o $(DAEMON_LIB_OBJ) $(TEST_COMMON_OBJ) $(PROTO_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

test:
	@tools/deps.sh
	@$(MAKE) --no-print-directory all
	@T="$(T)" tests/run-all

# ---- fuzzing: clang with libFuzzer and ASan/UBSan, a bounded time per target ----------
FUZZ_SECONDS ?= 30
# The engine, the protocol code and the daemon's parsers are compiled once with the sanitizers
# and libFuzzer's coverage (fuzzer-no-link) into build/fuzz/obj, and each target links against
# them: the targets build in parallel under make -j, and a change rebuilds only what it touches.
FUZZ_SAN    := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -fopenmp $(FUZZ_SAN) \
               -Iengine -Ikernels -I$(BUILD)/gen -I$(OPENBLAS_INC) $(PKG_CFLAGS)
FUZZ_LIB    := $(BUILD)/fuzz/libduogen-fuzz.a
FUZZ_OBJ    := $(patsubst %.c,$(BUILD)/fuzz/obj/%.o,$(ENGINE_SRC)) $(BUILD)/fuzz/obj/duogen.pb-c.o
# a target may link more of the daemon's objects (FUZZ_OBJ_<name>) or take defines (FUZZ_DEF_<name>)
FUZZ_OBJ_job := $(patsubst %.c,$(BUILD)/fuzz/obj/%.o,daemon/job.c daemon/outdir.c daemon/redis.c daemon/tls.c daemon/log.c daemon/daemon_config.c)
FUZZ_DEF_package := -DFUZZ_MKMODEL='"$(abspath $(BUILD))/mkmodel"'
$(BUILD)/fuzz/fuzz_package: $(BUILD)/mkmodel
$(BUILD)/fuzz/fuzz_job: $(FUZZ_OBJ_job)
FUZZ_OBJ_url := $(FUZZ_OBJ_job)
$(BUILD)/fuzz/fuzz_url: $(FUZZ_OBJ_url)

$(BUILD)/fuzz/obj/%.o: %.c | $(PROTO_H)
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	@clang $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@
$(BUILD)/fuzz/obj/duogen.pb-c.o: $(PROTO_C)
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	@clang $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_LIB): $(FUZZ_OBJ)
	@echo "  AR      $@"
	@rm -f $@ && ar rcs $@ $^

$(BUILD)/fuzz/fuzz_%: tests/fuzz_%.c $(FUZZ_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@clang $(FUZZ_CFLAGS) -fsanitize=fuzzer $(FUZZ_DEF_$*) -MMD -MP -MF $@.d -o $@ $< $(FUZZ_OBJ_$*) $(FUZZ_LIB) $(LDLIBS)

# the allocation-failure test over the sanitized engine: a failure path that reads freed
# memory or does undefined arithmetic stops it (glibc alone catches only a double free)
$(BUILD)/fuzz/test_alloc_fail: tests/test_alloc_fail.c $(TEST_COMMON_SRC) $(FUZZ_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@clang $(FUZZ_CFLAGS) -Itests -o $@ tests/test_alloc_fail.c $(TEST_COMMON_SRC) $(FUZZ_LIB) $(ALLOC_WRAP) $(LDLIBS)

alloc-asan: $(BUILD)/fuzz/test_alloc_fail
	ASAN_OPTIONS=detect_leaks=0 $<

sanitize:
	@T="$(T)" tools/sanitize.sh asan
tsan:
	@T="$(T)" tools/sanitize.sh tsan

fuzz: $(FUZZ_BINS)
	@set -e; for f in $(FUZZ_BINS); do \
	  mkdir -p $(BUILD)/fuzz/corpus/$$(basename $$f); \
	  echo "fuzz: $$f for $(FUZZ_SECONDS) s"; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(BUILD)/fuzz/corpus/$$(basename $$f) \
	      $$( [ -d tests/fuzz-seeds/$$(basename $$f) ] && echo tests/fuzz-seeds/$$(basename $$f) ); \
	done

# ---- benchmarks ----------------------------------------------------------------------
# the small package the benchmarks run on, written when missing
SMALL_PACKAGE = @[ -d $(BUILD)/models/small ] || $(BUILD)/dg-bench --quick decoder >/dev/null
# BENCH_TAG: a suffix of the reports' names (bench-coretype-unset's "_coretype_unset", whose
# runs have OPENBLAS_CORETYPE unset even where `make bench OPENBLAS_CORETYPE=...` set it on the
# command line, which MAKEFLAGS would carry into the sub-make)
BENCH_TAG ?=
ifeq ($(BENCH_TAG),_coretype_unset)
unexport OPENBLAS_CORETYPE
override OPENBLAS_CORETYPE :=
endif
bench: bench-queue bench-tokenizer bench-decoder bench-drafts bench-batch bench-vision bench-image bench-e2e \
       bench-coretype-unset

# OPENBLAS_CORETYPE as this environment sets it (the figures above), and unset: where it is
# set, the benchmarks whose GEMMs OpenBLAS runs (the decoder's prefill, the vision tower, the
# DiT and VAE, in fp32 compute) again without it, into *_coretype_unset.json (the baselines
# too: the same run, the same setting)
bench-coretype-unset: all
	@if [ -n "$${OPENBLAS_CORETYPE:-}" ]; then \
	    echo "OPENBLAS_CORETYPE=$$OPENBLAS_CORETYPE above; now unset:"; \
	    env -u OPENBLAS_CORETYPE $(MAKE) --no-print-directory bench-decoder bench-vision bench-image BENCH_TAG=_coretype_unset; \
	else echo "OPENBLAS_CORETYPE is unset here: the figures above are the unset ones"; fi

bench-queue: all
	@mkdir -p $(BUILD)/bench
	/usr/bin/python3 tools/bench/bench_queue.py --json $(BUILD)/bench/queue.json
	/usr/bin/python3 tools/bench/redis_memory.py --json $(BUILD)/bench/redis_memory.json

# whole interleaved jobs through duogend on the CPU: jobs/hour, time per phase, prefix cache
bench-e2e: all
	@mkdir -p $(BUILD)/bench
	/usr/bin/python3 tools/bench/bench_e2e.py --json $(BUILD)/bench/e2e.json

# the text decoder (small preset, 1 and 2 threads), in bf16 compute beside the baselines at
# bf16 when the reference venv has them, as dg-bench's co-processes timed turn about with
# ours (tools/dg-bench/bench_decoder.c says why): llama.cpp on a BF16 GGUF of the same
# weights (bench_llamacpp.py --serve) and transformers (bench_transformers_decoder.py
# --serve); then ours alone in fp32 compute (decoder_fp32.json: no baseline of its precision)
LLAMACPP_SERVE = tools/reference/.venv/bin/python tools/reference/bench_llamacpp.py --serve
TRANSFORMERS_DECODER = tools/reference/.venv/bin/python tools/reference/bench_transformers_decoder.py --serve
bench-decoder: all
	@mkdir -p $(BUILD)/bench
	$(SMALL_PACKAGE)
	@peer=; if tools/reference/.venv/bin/python -c 'import llama_cpp' 2>/dev/null; then peer="$(LLAMACPP_SERVE)"; \
	    else echo "$@: no llama-cpp-python in tools/reference/.venv: no llama.cpp baseline"; fi; \
	tpeer=; if tools/reference/.venv/bin/python -c 'import transformers' 2>/dev/null; then tpeer="$(TRANSFORMERS_DECODER)"; \
	    else echo "$@: no transformers in tools/reference/.venv: no transformers baseline"; fi; \
	set -x; $(BUILD)/dg-bench --bf16-compute $${peer:+--llamacpp "$$peer"} $${tpeer:+--transformers "$$tpeer"} --json $(BUILD)/bench/decoder_bf16$(BENCH_TAG).json decoder && \
	$(BUILD)/dg-bench --json $(BUILD)/bench/decoder_fp32$(BENCH_TAG).json decoder

# decoding with drafts by prompt lookup against without (dg_sched_opts draft_tokens): the
# small preset's greedy jobs (bf16 compute, 1 and 2 threads) and llama.cpp's on the same
# weights (BF16 GGUF), plain and with the same drafts, timed turn about as dg-bench's
# co-process when the reference venv has llama-cpp-python; and the shapes model's jobs
bench-drafts: all
	@mkdir -p $(BUILD)/bench
	$(SMALL_PACKAGE)
	@peer=; if tools/reference/.venv/bin/python -c 'import llama_cpp' 2>/dev/null; then peer="$(LLAMACPP_SERVE)"; \
	    else echo "$@: no llama-cpp-python in tools/reference/.venv: no llama.cpp baseline"; fi; \
	set -x; $(BUILD)/dg-bench --bf16-compute --threads 1 $${peer:+--llamacpp "$$peer"} --json $(BUILD)/bench/drafts_t1.json drafts && \
	$(BUILD)/dg-bench --bf16-compute --threads 2 $${peer:+--llamacpp "$$peer"} --json $(BUILD)/bench/drafts_t2.json drafts

# continuous batching on the CPU, small preset: aggregate decode tok/s and jobs/hour against
# 1, 2, 4, 8, 16 concurrent jobs, the prefill/decode/draw split (fp32 compute, 2 threads);
# and the decode in bf16 compute on one thread, where issue 17's goal (8 sequences >= 4x one)
# is measured
bench-batch: all
	@mkdir -p $(BUILD)/bench
	$(BUILD)/dg-bench --json $(BUILD)/bench/batch.json batch_decode batch_jobs
	$(BUILD)/dg-bench --bf16-compute --threads 1 --json $(BUILD)/bench/batch_bf16_t1.json batch_decode

# the vision tower (small preset), and transformers beside it when the reference venv is there
# (float32 and bf16; ours in fp32 and in bf16 compute against the baseline of its precision),
# as dg-bench's co-process timed turn about with ours (bench_transformers_vision.py --serve)
TRANSFORMERS_VISION = tools/reference/.venv/bin/python tools/reference/bench_transformers_vision.py --serve
bench-vision: all
	@mkdir -p $(BUILD)/bench
	$(SMALL_PACKAGE)
	@peer=; if tools/reference/.venv/bin/python -c 'import transformers' 2>/dev/null; then peer="$(TRANSFORMERS_VISION)"; \
	    else echo "$@: no transformers in tools/reference/.venv: no transformers baseline"; fi; \
	set -x; $(BUILD)/dg-bench $${peer:+--transformers "$$peer"} --json $(BUILD)/bench/vision$(BENCH_TAG).json vision && \
	$(BUILD)/dg-bench --bf16-compute $${peer:+--transformers "$$peer --dtype bf16"} --json $(BUILD)/bench/vision_bf16$(BENCH_TAG).json vision

# DiT steps and VAE encode/decode (small preset), fp32 and bf16 compute; diffusers beside
# them (float32, and the DiT in bf16) when the reference venv is there, as dg-bench's
# co-process timed turn about with ours (bench_diffusers.py --serve)
DIFFUSERS_SERVE = tools/reference/.venv/bin/python tools/reference/bench_diffusers.py --serve
bench-image: all
	@mkdir -p $(BUILD)/bench
	$(SMALL_PACKAGE)
	@peer=; if tools/reference/.venv/bin/python -c 'import diffusers' 2>/dev/null; then peer="$(DIFFUSERS_SERVE)"; \
	    else echo "$@: no diffusers in tools/reference/.venv: no diffusers baseline"; fi; \
	set -x; $(BUILD)/dg-bench --threads 2 $${peer:+--diffusers "$$peer"} --json $(BUILD)/bench/image$(BENCH_TAG).json image && \
	$(BUILD)/dg-bench --threads 2 --bf16-compute $${peer:+--diffusers "$$peer --dtype bf16"} --json $(BUILD)/bench/image_bf16$(BENCH_TAG).json image

# the tokenizer, then Hugging Face tokenizers (one thread) on the corpus it wrote when the
# reference venv has it, its ratios against this run's report (bench_tokenizers.py)
bench-tokenizer: all
	@mkdir -p $(BUILD)/bench
	@rm -f $(BUILD)/bench/tokenizer_hf.json
	$(BUILD)/dg-bench --json $(BUILD)/bench/tokenizer.json tokenizer
	@if tools/reference/.venv/bin/python -c 'import tokenizers' 2>/dev/null; then \
	    tools/reference/.venv/bin/python tools/reference/bench_tokenizers.py --json $(BUILD)/bench/tokenizer_hf.json; \
	else echo "$@: no tokenizers in tools/reference/.venv: no tokenizers baseline"; fi

# ---- the soak: faults over a long run (SOAK_ARGS="--engine real": the real engine on the tiny
# package, 1000 jobs; --help lists the rest) -------------------------------------------------
soak: all
	@mkdir -p $(BUILD)/bench
	/usr/bin/python3 tools/soak/soak.py --json $(BUILD)/bench/soak.json $(SOAK_ARGS)

# ---- systemd for real: duogend@0 in a booted Debian container (systemd-nspawn), not in
# `make test` (root, systemd-container, debootstrap; the root is kept in build/nspawn) ------
systemd-check: all
	tools/systemd/nspawn-check.sh

# ---- the shapes model (tools/train/) ---------------------------------------------------
# train-shapes: every training stage into $(BUILD)/train (checkpointed: run it again to
# resume), the package into tools/train/shapes/, then its goldens (tests/golden/shapes/);
# PyTorch comes from PyPI into tools/train/.venv (TRAIN_PY= another interpreter that has it).
# eval-shapes: held-out conversations through duogend, scored (tools/train/eval.py).
TRAIN_PY ?= tools/train/.venv/bin/python
TRAIN_DEVICE ?= cpu
train-shapes:
	@[ -x $(TRAIN_PY) ] || tools/setup-venv.sh tools/train
	nice $(TRAIN_PY) tools/train/train.py --work $(BUILD)/train --out tools/train/shapes --device $(TRAIN_DEVICE)
	nice $(TRAIN_PY) tools/train/make_shapes_goldens.py
	$(MAKE) eval-shapes MONTAGE=tools/train/shapes/samples.png

# the montage of the shipped model's answers is the training's (train-shapes); a later
# scoring writes its own under build/, and the checkout stays as it was
MONTAGE ?= $(BUILD)/train/samples.png
eval-shapes: all
	@mkdir -p $(BUILD)/train
	nice /usr/bin/python3 tools/train/eval.py --model tools/train/shapes --json $(BUILD)/train/eval.json \
	    --montage $(MONTAGE)

# ---- set-up --------------------------------------------------------------------------
deps:
	tools/deps.sh

demo:
	@tools/demo.sh

# Binaries to $(PREFIX)/bin; units, sysusers and tmpfiles snippets to $(PREFIX)/lib/systemd
# paths that systemd searches (with ExecStart pointing at $(PREFIX)/bin); examples to
# $(PREFIX)/share/duogen/examples (the producers' sources in examples/producers); the Qwen2
# vocabulary mkmodel uses to $(PREFIX)/share/duogen/vocab/qwen2; the manual pages to
# $(PREFIX)/share/man/man{1,5,8}.
# Nothing under /etc is overwritten.
UNITDIR ?= $(PREFIX)/lib/systemd/system
install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/lib/sysusers.d \
	           $(DESTDIR)$(PREFIX)/lib/tmpfiles.d $(DESTDIR)$(PREFIX)/share/duogen/examples \
	           $(DESTDIR)$(PREFIX)/share/doc/duogen
	install -m 0755 $(BUILD)/duogend $(BUILD)/duogenctl $(BUILD)/mkmodel $(BUILD)/dg-tokenize \
	           $(DESTDIR)$(PREFIX)/bin/
	sed 's#/usr/local/#$(PREFIX)/#g' systemd/duogend@.service > $(DESTDIR)$(UNITDIR)/duogend@.service
	sed 's#/usr/local/#$(PREFIX)/#g' systemd/duogend.target > $(DESTDIR)$(UNITDIR)/duogend.target
	chmod 0644 $(DESTDIR)$(UNITDIR)/duogend@.service $(DESTDIR)$(UNITDIR)/duogend.target
	install -m 0644 systemd/duogen.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/duogen.conf
	install -m 0644 systemd/duogen.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/duogen.conf
	install -m 0644 systemd/duogend.conf.example systemd/duogend.env.example \
	           deploy/redis/redis.conf deploy/redis/users.acl.example $(DESTDIR)$(PREFIX)/share/duogen/examples/
	install -m 0644 README.md LICENSE $(DESTDIR)$(PREFIX)/share/doc/duogen/
	for d in python ruby go c; do install -d $(DESTDIR)$(PREFIX)/share/duogen/examples/producers/$$d && \
	    install -m 0644 examples/producers/$$d/* $(DESTDIR)$(PREFIX)/share/duogen/examples/producers/$$d/; done
	install -m 0644 examples/producers/README.md $(DESTDIR)$(PREFIX)/share/duogen/examples/producers/
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/man/man8
	install -m 0644 $(BUILD)/man/duogenctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 0644 $(BUILD)/man/duogend.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/
	install -m 0644 $(BUILD)/man/duogend.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -d $(DESTDIR)$(PREFIX)/share/duogen/vocab/qwen2
	install -m 0644 tools/mkmodel/vocab/qwen2/* $(DESTDIR)$(PREFIX)/share/duogen/vocab/qwen2/
	if [ -f $(BUILD)/libduogen_cuda.so ]; then install -d $(DESTDIR)$(PREFIX)/lib/duogen && \
	    install -m 0755 $(BUILD)/libduogen_cuda.so $(DESTDIR)$(PREFIX)/lib/duogen/; fi

# Everything install put there (not /etc, not the data under /srv and /var); the shared
# directories (bin, man, systemd's) stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/duogend $(DESTDIR)$(PREFIX)/bin/duogenctl $(DESTDIR)$(PREFIX)/bin/mkmodel \
	      $(DESTDIR)$(PREFIX)/bin/dg-tokenize $(DESTDIR)$(UNITDIR)/duogend@.service $(DESTDIR)$(UNITDIR)/duogend.target \
	      $(DESTDIR)$(PREFIX)/lib/sysusers.d/duogen.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/duogen.conf \
	      $(DESTDIR)$(PREFIX)/share/man/man1/duogenctl.1 $(DESTDIR)$(PREFIX)/share/man/man5/duogend.conf.5 \
	      $(DESTDIR)$(PREFIX)/share/man/man8/duogend.8
	rm -rf $(DESTDIR)$(PREFIX)/share/duogen $(DESTDIR)$(PREFIX)/share/doc/duogen $(DESTDIR)$(PREFIX)/lib/duogen

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj $(BUILD)/fuzz -name '*.d' 2>/dev/null)

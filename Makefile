# moetrain — build, test, train.
#   make            build build/moetrain (+ tools and tests)
#   make test       build and run the whole test suite (what CI runs)
#   make train      train configs/tiny.ini on 4 ranks (dp4 x ep2); NP=1 TRAIN_SETS= for one
#   make bench      run the CPU benchmarks (not part of the tests)
#   make plots      PNGs of a metrics file (scripts/plot-metrics): METRICS (default: CONFIG's
#                   log.metrics_file, what make train writes) into OUT (default plots/)
# Overrides: CC, MPICC, CUDA_HOME, OPT (e.g. OPT="-O2 -g"), CONFIG (for make train), NVCC (NVCC= :
# a CPU-only build even where nvcc exists).
# Missing Debian packages are installed by scripts/install-deps.sh (run automatically).

MPICC     ?= mpicc
CUDA_HOME ?= /usr/local/cuda
OPT       ?= -O3 -march=native
CONFIG    ?= configs/tiny.ini
# make train: tiny on 4 ranks, data x expert parallel (dp4 x ep2), the same 16-sequence global
# batch as one rank with micro_batch_size 16. `make train NP=1 TRAIN_SETS=` trains on one rank.
NP        ?= 4
TRAIN_SETS ?= --set parallel.ep=2 --set train.micro_batch_size=4
BUILD     := build

PKGS := inih check libcjson openblas hdf5-openmpi libcrypto

# Lazily evaluated (=): read after the deps stamp has been made.
DEP_CFLAGS = $(shell pkg-config --cflags inih libcjson openblas hdf5-openmpi libcrypto)
DEP_LIBS   = $(shell pkg-config --libs inih libcjson openblas hdf5-openmpi libcrypto) -lm $(CUDA_LIBS)
CHECK_CFLAGS = $(shell pkg-config --cflags check)
CHECK_LIBS   = $(shell pkg-config --libs check)

WARN   := -Wall -Wextra -Werror=implicit-function-declaration -Wno-unused-parameter
CFLAGS := -std=gnu11 $(OPT) $(WARN) -Isrc -D_GNU_SOURCE
ALLC    = $(CFLAGS) $(DEP_CFLAGS)

LIB_SRC := src/common.c src/blas.c src/config.c src/data.c src/kernels_cpu.c src/params.c \
           src/model.c src/moe.c src/pipeline.c src/eval.c src/hf.c src/train.c src/metrics.c src/checkpoint.c src/stop.c src/backend.c \
           src/optim/adamw.c src/optim/schedule.c src/optim/shard.c src/parallel/mesh.c src/parallel/comm.c src/parallel/dispatch.c

# ---- CUDA backend (cuda/*.cu), built when nvcc is found ------------------------------------
# With nvcc: cuda/*.cu go into the library, C files see MT_HAVE_CUDA=1 and every binary links
# the CUDA libraries. Without: src/kernels_cuda_stub.c stands in (kernels_cuda() is NULL) and the
# build is CPU only. NCCL is optional inside a CUDA build (runtime.comm = nccl then refuses).
NVCC   := $(shell command -v nvcc 2>/dev/null || ls $(CUDA_HOME)/bin/nvcc 2>/dev/null)
NCCL_H := $(firstword $(wildcard $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h))
CUDNN_H := $(firstword $(wildcard $(CUDA_HOME)/include/cudnn.h /usr/include/cudnn.h))
ifneq ($(NVCC),)
HAVE_NCCL := $(if $(NCCL_H),1,0)
HAVE_CUDNN := $(if $(CUDNN_H),1,0)
CUDA_SRC  := $(wildcard cuda/*.cu cuda/*.cpp)
CUDA_OBJ  := $(patsubst %.cpp,$(BUILD)/%.o,$(CUDA_SRC:%.cu=$(BUILD)/%.o))
NVCCFLAGS := -O3 -std=c++17 -Isrc -Icuda -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
             -gencode arch=compute_80,code=sm_80 \
             -gencode arch=compute_90,code=sm_90 -DMT_HAVE_NCCL=$(HAVE_NCCL)
# cuda/*.cpp: host-only C++ (the cuDNN frontend graph code); the frontend headers are vendored.
CXX       ?= g++
CXXFLAGS  := -O2 -std=c++17 -Wall -Wextra -Wno-unused-parameter -Isrc -Icuda \
             -isystem third_party/cudnn-frontend/include -isystem $(CUDA_HOME)/include \
             -DMT_HAVE_CUDNN=$(HAVE_CUDNN)
CFLAGS    += -DMT_HAVE_CUDA=1 -DMT_HAVE_CUDNN=$(HAVE_CUDNN)
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt \
             $(if $(filter 1,$(HAVE_NCCL)),-lnccl) $(if $(filter 1,$(HAVE_CUDNN)),-lcudnn -lnvrtc) -lstdc++
else
LIB_SRC   += src/kernels_cuda_stub.c
endif

LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o) $(CUDA_OBJ)
LIB     := $(BUILD)/libmoetrain.a
HEADERS  = $(wildcard src/*.h src/*/*.h cuda/*.h)

TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON := $(BUILD)/tests/testutil.o

# Objects are rebuilt when the compile flags change (CPU <-> CUDA build, OPT, CC).
FLAGS_STAMP := $(BUILD)/.flags
FLAGS_NOW   := $(MPICC) $(CFLAGS) | $(NVCC) $(NVCCFLAGS) | $(CXX) $(CXXFLAGS)
$(shell mkdir -p $(BUILD) && (echo '$(FLAGS_NOW)' | cmp -s - $(FLAGS_STAMP) || echo '$(FLAGS_NOW)' > $(FLAGS_STAMP)))

.PHONY: all test train bench clean deps docs plots
.SECONDARY:
all: $(BUILD)/moetrain $(BUILD)/mt-tokenize $(TEST_BIN) $(BUILD)/tests/fault_write.so

# ---- dependencies ------------------------------------------------------------------------
DEPS_STAMP := $(BUILD)/.deps-ok
$(DEPS_STAMP): scripts/install-deps.sh
	@mkdir -p $(BUILD)
	@scripts/install-deps.sh --check >/dev/null 2>&1 || scripts/install-deps.sh
	@scripts/install-deps.sh --check
	@if [ -n "$(NVCC)" ]; then echo "  ✓ nvcc: $(NVCC) (CUDA backend: cuda/*.cu)"; else echo "  ✗ nvcc not found: CPU build only"; fi
	@if [ -z "$(NVCC)" ]; then echo "  ✗ NCCL not used (CPU build)"; \
	elif [ -n "$(NCCL_H)" ]; then echo "  ✓ NCCL: $(NCCL_H) $$(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' $(NCCL_H) | paste -sd.)"; \
	else echo "  ✗ NCCL not found: runtime.comm = nccl unavailable"; fi
	@if [ -z "$(NVCC)" ]; then echo "  ✗ cuDNN not used (CPU build)"; \
	elif [ -n "$(CUDNN_H)" ]; then echo "  ✓ cuDNN: $(CUDNN_H) $$(sed -n 's/^#define CUDNN_\(MAJOR\|MINOR\|PATCHLEVEL\) \([0-9]*\).*/\2/p' $(dir $(CUDNN_H))cudnn_version.h | paste -sd.)"; \
	else echo "  ✗ cuDNN not found: runtime.attention = auto uses the own kernel"; fi
	@touch $@
deps: $(DEPS_STAMP)

# ---- library, binaries -------------------------------------------------------------------
$(BUILD)/%.o: %.c $(DEPS_STAMP) $(FLAGS_STAMP) $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) -c $< -o $@

$(BUILD)/cuda/%.o: cuda/%.cu $(DEPS_STAMP) $(FLAGS_STAMP) $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  NVCC $<"
	@$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/cuda/%.o: cuda/%.cpp $(DEPS_STAMP) $(FLAGS_STAMP) $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CXX $<"
	@$(CXX) $(CXXFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@echo "  AR  $@"
	@rm -f $@ && ar rcs $@ $^

$(BUILD)/moetrain: $(BUILD)/src/main.o $(LIB)
	@echo "  LD  $@"
	@$(MPICC) $(ALLC) $^ $(DEP_LIBS) -o $@

$(BUILD)/mt-tokenize: $(BUILD)/src/tools/tokenize.o $(LIB)
	@echo "  LD  $@"
	@$(MPICC) $(ALLC) $^ $(DEP_LIBS) -o $@

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(TEST_COMMON) $(LIB)
	@echo "  LD  $@"
	@$(MPICC) $(ALLC) $^ $(CHECK_LIBS) $(DEP_LIBS) -o $@

$(BUILD)/tests/%.o: tests/%.c $(DEPS_STAMP) $(FLAGS_STAMP) $(HEADERS) $(wildcard tests/*.h)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) $(CHECK_CFLAGS) -c $< -o $@

# LD_PRELOAD shim that damages one write to a chosen file (tests/test_faults.sh)
$(BUILD)/tests/fault_write.so: tests/fault_write.c
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(CC) -std=gnu11 -O2 -Wall -Wextra -fPIC -shared $< -o $@ -ldl

# ---- commands ----------------------------------------------------------------------------
test: all
	tests/run.sh $(BUILD)

train: $(BUILD)/moetrain
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
	  mpirun --oversubscribe --bind-to none -np $(NP) $(BUILD)/moetrain $(CONFIG) $(TRAIN_SETS)

# make plots: the metrics file named by CONFIG's [log] metrics_file, unless METRICS= is given.
METRICS ?= $(shell awk -F= '/^[ \t]*\[/ {s = $$0; gsub(/[ \t]/, "", s)} s == "[log]" && $$1 ~ /^[ \t]*metrics_file[ \t]*$$/ {v = $$2; gsub(/^[ \t]+|[ \t]+$$/, "", v); print v}' $(CONFIG) 2>/dev/null)
OUT     ?= plots
plots:
	@if [ -z "$(METRICS)" ]; then echo "make plots: $(CONFIG) sets no [log] metrics_file; give METRICS=FILE" >&2; exit 2; fi
	@scripts/plot-metrics --check >/dev/null 2>&1 || scripts/install-deps.sh --plots >/dev/null || scripts/install-deps.sh --check --plots
	scripts/plot-metrics $(METRICS) $(OUT)

bench: $(BUILD)/moetrain $(BUILD)/bench/bench_step $(BUILD)/bench/bench_dispatch $(BUILD)/bench/bench_checkpoint $(BUILD)/bench/bench_gpu $(BUILD)/bench/bench_tpcp $(BUILD)/bench/bench_pipeline
	bench/run.sh $(BUILD)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	$(MPICC) $(ALLC) $^ $(DEP_LIBS) -o $@

$(BUILD)/bench/%.o: bench/%.c $(DEPS_STAMP) $(FLAGS_STAMP) $(HEADERS)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) -c $< -o $@

# docs/config.md is generated from the parser's key table.
docs: $(BUILD)/moetrain
	$(BUILD)/moetrain --help-markdown > docs/config.md

clean:
	rm -rf $(BUILD)

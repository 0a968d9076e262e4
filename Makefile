# moetrain — build, test, train.
#   make            build build/moetrain (+ tools and tests)
#   make test       build and run the whole test suite (what CI runs)
#   make train      train configs/tiny.ini on 4 ranks (dp4 x ep2); NP=1 TRAIN_SETS= for one
#   make bench      run the CPU benchmarks (not part of the tests)
# Overrides: CC, MPICC, CUDA_HOME, OPT (e.g. OPT="-O2 -g"), CONFIG (for make train).
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

PKGS := inih check libcjson openblas hdf5-openmpi

# Lazily evaluated (=): read after the deps stamp has been made.
DEP_CFLAGS = $(shell pkg-config --cflags inih libcjson openblas hdf5-openmpi)
DEP_LIBS   = $(shell pkg-config --libs inih libcjson openblas hdf5-openmpi) -lm
CHECK_CFLAGS = $(shell pkg-config --cflags check)
CHECK_LIBS   = $(shell pkg-config --libs check)

WARN   := -Wall -Wextra -Werror=implicit-function-declaration -Wno-unused-parameter
CFLAGS := -std=gnu11 $(OPT) $(WARN) -Isrc -D_GNU_SOURCE
ALLC    = $(CFLAGS) $(DEP_CFLAGS)

LIB_SRC := src/common.c src/blas.c src/config.c src/data.c src/kernels_cpu.c src/params.c \
           src/model.c src/moe.c src/train.c src/metrics.c src/checkpoint.c src/stop.c \
           src/optim/adamw.c src/optim/schedule.c src/optim/shard.c src/parallel/mesh.c src/parallel/comm.c src/parallel/dispatch.c
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB     := $(BUILD)/libmoetrain.a

TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON := $(BUILD)/tests/testutil.o

NVCC := $(shell command -v nvcc 2>/dev/null || ls $(CUDA_HOME)/bin/nvcc 2>/dev/null)

.PHONY: all test train bench clean deps docs
.SECONDARY:
all: $(BUILD)/moetrain $(BUILD)/mt-tokenize $(TEST_BIN)

# ---- dependencies ------------------------------------------------------------------------
DEPS_STAMP := $(BUILD)/.deps-ok
$(DEPS_STAMP): scripts/install-deps.sh
	@mkdir -p $(BUILD)
	@scripts/install-deps.sh --check >/dev/null 2>&1 || scripts/install-deps.sh
	@scripts/install-deps.sh --check
	@if [ -n "$(NVCC)" ]; then echo "  ✓ nvcc: $(NVCC) (CUDA objects: issue 5)"; else echo "  ✗ nvcc not found: CPU build only"; fi
	@touch $@
deps: $(DEPS_STAMP)

# ---- library, binaries -------------------------------------------------------------------
$(BUILD)/%.o: %.c $(DEPS_STAMP) $(wildcard src/*.h src/*/*.h)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) -c $< -o $@

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

$(BUILD)/tests/%.o: tests/%.c $(DEPS_STAMP) $(wildcard src/*.h src/*/*.h tests/*.h)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) $(CHECK_CFLAGS) -c $< -o $@

# ---- commands ----------------------------------------------------------------------------
test: all
	tests/run.sh $(BUILD)

train: $(BUILD)/moetrain
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
	  mpirun --oversubscribe -np $(NP) $(BUILD)/moetrain $(CONFIG) $(TRAIN_SETS)

bench: $(BUILD)/moetrain $(BUILD)/bench/bench_step $(BUILD)/bench/bench_dispatch
	bench/run.sh $(BUILD)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	$(MPICC) $(ALLC) $^ $(DEP_LIBS) -o $@

$(BUILD)/bench/%.o: bench/%.c $(DEPS_STAMP) $(wildcard src/*.h src/*/*.h)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) -c $< -o $@

# docs/config.md is generated from the parser's key table.
docs: $(BUILD)/moetrain
	$(BUILD)/moetrain --help-markdown > docs/config.md

clean:
	rm -rf $(BUILD)

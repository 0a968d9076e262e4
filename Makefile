# moetrain — build, test, train.
#   make            build build/moetrain (+ tools and tests)
#   make test       build and run the whole test suite (what CI runs)
#   make train      train configs/tiny.ini on 4 ranks (dp4 x ep2); NP=1 TRAIN_SETS= for one
#   make bench      run the CPU benchmarks (not part of the tests)
#   make plots      PNGs of a metrics file (scripts/plot-metrics): METRICS (default: CONFIG's
#                   log.metrics_file, what make train writes) into OUT (default plots/)
# Overrides: OPT (e.g. OPT="-O2 -g"), CONFIG (for make train), NVCC (NVCC= : a CPU-only build even
# where nvcc exists), CUDA_ARCHS / CUDA_PTX, and where the libraries are (next section).
# Missing Debian packages are installed by scripts/install-deps.sh (run automatically, only when
# something is missing); NO_INSTALL=1 never installs: a missing library is an error naming it.

# ---- where the libraries are (override on a cluster without Debian's packages) ---------------
#   MPI_HOME=/opt/openmpi          MPICC = $(MPI_HOME)/bin/mpicc (or set MPICC itself)
#   HDF5_HOME=/opt/hdf5-parallel   -I$(HDF5_HOME)/include, -L$(HDF5_HOME)/lib -lhdf5 (MPI build)
#   BLAS_CFLAGS=... BLAS_LIBS=...  the CBLAS to link (e.g. BLAS_LIBS="-L/opt/openblas/lib -lopenblas")
#   CUDA_HOME=/usr/local/cuda      nvcc, CUDA libraries, NCCL and cuDNN headers
# Defaults: mpicc from PATH, pkg-config hdf5-openmpi, and OpenBLAS's OpenMP build when installed
# (Debian's libopenblas-openmp-dev: its threads are the kernels' OpenMP threads, one pool), else
# pkg-config openblas.
MPI_HOME  ?=
MPICC     ?= $(if $(MPI_HOME),$(MPI_HOME)/bin/mpicc,mpicc)
HDF5_HOME ?=
CUDA_HOME ?= /usr/local/cuda
NO_INSTALL ?=
OPT       ?= -O3 -march=native
CONFIG    ?= configs/tiny.ini
# make train: tiny on 4 ranks, data x expert parallel (dp4 x ep2), the same 16-sequence global
# batch as one rank with micro_batch_size 16. `make train NP=1 TRAIN_SETS=` trains on one rank.
NP        ?= 4
TRAIN_SETS ?= --set parallel.ep=2 --set train.micro_batch_size=4
BUILD     := build

PKGS := inih check libcjson openblas hdf5-openmpi libcrypto

# Lazily evaluated (=): read after the deps stamp has been made. openblas and hdf5-openmpi come
# from BLAS_* and HDF5_* (overridable); the other PKGS from pkg-config.
PC_PKGS     = $(filter-out check openblas hdf5-openmpi,$(PKGS))
ifeq ($(origin HDF5_CFLAGS)$(HDF5_HOME),undefined)
HDF5_CFLAGS = $(shell pkg-config --cflags hdf5-openmpi)
HDF5_LIBS   = $(shell pkg-config --libs hdf5-openmpi)
else ifneq ($(HDF5_HOME),)
HDF5_CFLAGS ?= -I$(HDF5_HOME)/include
HDF5_LIBS   ?= -L$(HDF5_HOME)/lib -Wl,-rpath,$(HDF5_HOME)/lib -lhdf5
endif
comma := ,
BLAS_USER := $(if $(filter undefined,$(origin BLAS_LIBS)),,1)
OPENBLAS_OMP = $(patsubst %/pkgconfig/openblas.pc,%,$(firstword $(wildcard /usr/lib/*/openblas-openmp/pkgconfig/openblas.pc)))
ifeq ($(origin BLAS_LIBS),undefined)
BLAS_CFLAGS = $(if $(OPENBLAS_OMP),$(shell PKG_CONFIG_PATH=$(OPENBLAS_OMP)/pkgconfig pkg-config --cflags openblas),$(shell pkg-config --cflags openblas))
BLAS_LIBS   = $(if $(OPENBLAS_OMP),-L$(OPENBLAS_OMP) -Wl$(comma)-rpath$(comma)$(OPENBLAS_OMP) -lopenblas,$(shell pkg-config --libs openblas))
endif
DEP_CFLAGS = $(shell pkg-config --cflags $(PC_PKGS)) $(BLAS_CFLAGS) $(HDF5_CFLAGS)
DEP_LIBS   = $(shell pkg-config --libs $(PC_PKGS)) $(BLAS_LIBS) $(HDF5_LIBS) -lm $(CUDA_LIBS)
CHECK_CFLAGS = $(shell pkg-config --cflags check)
CHECK_LIBS   = $(shell pkg-config --libs check)

WARN   := -Wall -Wextra -Werror=implicit-function-declaration -Wno-unused-parameter
# OpenMP (libgomp): the CPU kernels outside GEMMs run on runtime.threads threads.
OPENMP ?= -fopenmp
# -fno-math-errno: no code reads errno after a math call; without it sqrtf() cannot be vectorised
# (AdamW's loop ran scalar). IEEE results are unchanged (sqrt is exact either way).
CFLAGS := -std=gnu11 $(OPT) -fno-math-errno $(WARN) $(OPENMP) -Isrc -D_GNU_SOURCE
# Every object depends on the headers it includes: the compilers write build/**/*.d (included at
# the end of this file).
DEPFLAGS := -MMD -MP
ALLC    = $(CFLAGS) $(DEP_CFLAGS)

LIB_SRC := src/common.c src/blas.c src/config.c src/data.c src/kernels_cpu.c src/route_plan.c src/params.c \
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
# GPU code: SASS for each of CUDA_ARCHS (A100, H100/H200, B200) this nvcc supports, plus PTX of
# CUDA_PTX, which the driver compiles for any newer GPU.
CUDA_ARCHS ?= 80 90 100
CUDA_PTX   ?= 100
NVCC_ARCHS := $(shell $(NVCC) --list-gpu-arch 2>/dev/null)
CUDA_OK    := $(foreach a,$(CUDA_ARCHS),$(if $(filter compute_$(a),$(NVCC_ARCHS)),$(a)))
CUDA_PTX_OK := $(if $(filter compute_$(CUDA_PTX),$(NVCC_ARCHS)),$(CUDA_PTX),$(lastword $(CUDA_OK)))
GENCODE    := $(foreach a,$(CUDA_OK),-gencode arch=compute_$(a),code=sm_$(a)) \
              $(if $(CUDA_PTX_OK),-gencode arch=compute_$(CUDA_PTX_OK)$(comma)code=compute_$(CUDA_PTX_OK))
NVCCFLAGS := -O3 -std=c++17 -Isrc -Icuda -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
             $(GENCODE) -DMT_HAVE_NCCL=$(HAVE_NCCL)
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

TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON := $(BUILD)/tests/testutil.o

# Objects are rebuilt when the compile flags change (CPU <-> CUDA build, OPT, CC).
FLAGS_STAMP := $(BUILD)/.flags
FLAGS_NOW   := $(MPICC) $(CFLAGS) | $(NVCC) $(NVCCFLAGS) | $(CXX) $(CXXFLAGS) | $(HDF5_HOME) $(BLAS_LIBS)
$(shell mkdir -p $(BUILD) && (echo '$(FLAGS_NOW)' | cmp -s - $(FLAGS_STAMP) || echo '$(FLAGS_NOW)' > $(FLAGS_STAMP)))

.PHONY: all test train bench clean deps docs plots
.SECONDARY:
all: $(BUILD)/moetrain $(BUILD)/mt-tokenize $(TEST_BIN) $(BUILD)/tests/fault_write.so

# ---- dependencies ------------------------------------------------------------------------
DEPS_STAMP := $(BUILD)/.deps-ok
# Installs (apt-get) only when the check finds something missing, never with NO_INSTALL=1. The
# check honours MPI_HOME / MPICC, HDF5_HOME and BLAS_LIBS (exported to it).
DEPS_ENV := MT_MPICC='$(MPICC)' MT_HDF5_HOME='$(HDF5_HOME)' MT_BLAS_LIBS='$(BLAS_USER)'
$(DEPS_STAMP): scripts/install-deps.sh
	@mkdir -p $(BUILD)
	@if [ -n "$(filter-out 0,$(NO_INSTALL))" ]; then \
	  $(DEPS_ENV) scripts/install-deps.sh --check || { echo "make: NO_INSTALL=$(NO_INSTALL): nothing is installed; install what is marked ✗, or point MPI_HOME, HDF5_HOME, BLAS_LIBS at it (README: Build)" >&2; exit 1; }; \
	else \
	  $(DEPS_ENV) scripts/install-deps.sh --check --all >/dev/null 2>&1 || $(DEPS_ENV) scripts/install-deps.sh; \
	  $(DEPS_ENV) scripts/install-deps.sh --check; \
	fi
	@echo "  BLAS: $(if $(BLAS_USER),BLAS_LIBS=$(BLAS_LIBS),$(if $(OPENBLAS_OMP),OpenBLAS (OpenMP build) $(OPENBLAS_OMP),OpenBLAS (pkg-config openblas; its pthreads build runs its own thread pool beside the kernels' OpenMP threads)))"
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
$(BUILD)/%.o: %.c $(DEPS_STAMP) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) $(DEPFLAGS) -c $< -o $@

$(BUILD)/cuda/%.o: cuda/%.cu $(DEPS_STAMP) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@echo "  NVCC $<"
	@$(NVCC) $(NVCCFLAGS) -MD -MF $(@:.o=.d) -MP -c $< -o $@

$(BUILD)/cuda/%.o: cuda/%.cpp $(DEPS_STAMP) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@echo "  CXX $<"
	@$(CXX) $(CXXFLAGS) $(DEPFLAGS) -c $< -o $@

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

$(BUILD)/tests/%.o: tests/%.c $(DEPS_STAMP) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) $(CHECK_CFLAGS) $(DEPFLAGS) -c $< -o $@

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

bench: $(BUILD)/moetrain $(BUILD)/bench/bench_step $(BUILD)/bench/bench_dispatch $(BUILD)/bench/bench_checkpoint $(BUILD)/bench/bench_gpu $(BUILD)/bench/bench_tpcp $(BUILD)/bench/bench_pipeline $(BUILD)/bench/bench_overlap
	bench/run.sh $(BUILD)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	$(MPICC) $(ALLC) $^ $(DEP_LIBS) -o $@

$(BUILD)/bench/%.o: bench/%.c $(DEPS_STAMP) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(MPICC) $(ALLC) $(DEPFLAGS) -c $< -o $@

# docs/config.md is generated from the parser's key table.
docs: $(BUILD)/moetrain
	$(BUILD)/moetrain --help-markdown > docs/config.md

clean:
	rm -rf $(BUILD)

# Header dependencies written by the compilers (DEPFLAGS): an object whose headers changed is rebuilt.
-include $(wildcard $(BUILD)/src/*.d $(BUILD)/src/*/*.d $(BUILD)/cuda/*.d $(BUILD)/tests/*.d $(BUILD)/bench/*.d)

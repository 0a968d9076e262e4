/* vmm.cu — CUDA virtual memory management for reserve blocks; vmm.h is the contract. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "cuda_check.h"
#include "vmm.h"

/* The driver entry points used, resolved once by vmm_init (ABI of CUDA 12.0). */
static struct {
    PFN_cuGetErrorString_v6000 error_string;
    PFN_cuDeviceGet_v2000 device_get;
    PFN_cuDeviceGetAttribute_v2000 attribute;
    PFN_cuMemGetAllocationGranularity_v10020 granularity;
    PFN_cuMemAddressReserve_v10020 reserve;
    PFN_cuMemAddressFree_v10020 address_free;
    PFN_cuMemCreate_v10020 create;
    PFN_cuMemRelease_v10020 release;
    PFN_cuMemMap_v10020 map;
    PFN_cuMemUnmap_v10020 unmap;
    PFN_cuMemSetAccess_v10020 set_access;
    CUmemAllocationProp prop; /* pinned device memory of this rank's GPU */
    CUmemAccessDesc access;   /* read-write for that GPU */
} g_drv;

static const char *drv_error(CUresult r) {
    const char *s = NULL;
    if (g_drv.error_string) g_drv.error_string(r, &s);
    return s ? s : "unknown driver error";
}

#define DRV_CHECK(call)                                                                            \
    do {                                                                                           \
        CUresult r_ = (call);                                                                      \
        if (r_ != CUDA_SUCCESS) mt_check_failed(__FILE__, __LINE__, #call, "CUDA driver: %s", drv_error(r_)); \
    } while (0)

/* Resolve one entry point; 0 (and why) if the driver does not have it. */
static int resolve(const char *name, void **fn, char *why, size_t len) {
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    cudaError_t e = cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &q);
    if (e == cudaSuccess && q == cudaDriverEntryPointSuccess && *fn) return 1;
    (void)cudaGetLastError();
    snprintf(why, len, "the driver has no %s (%s)", name, e == cudaSuccess ? "symbol not found" : cudaGetErrorString(e));
    return 0;
}

#define RESOLVE(field, name)                                                                       \
    if (!resolve(name, (void **)&g_drv.field, why, len)) return 0

size_t vmm_init(int device, char *why, size_t len) {
    RESOLVE(error_string, "cuGetErrorString");
    RESOLVE(device_get, "cuDeviceGet");
    RESOLVE(attribute, "cuDeviceGetAttribute");
    RESOLVE(granularity, "cuMemGetAllocationGranularity");
    RESOLVE(reserve, "cuMemAddressReserve");
    RESOLVE(address_free, "cuMemAddressFree");
    RESOLVE(create, "cuMemCreate");
    RESOLVE(release, "cuMemRelease");
    RESOLVE(map, "cuMemMap");
    RESOLVE(unmap, "cuMemUnmap");
    RESOLVE(set_access, "cuMemSetAccess");
    CUdevice dev;
    DRV_CHECK(g_drv.device_get(&dev, device));
    int ok = 0;
    CUresult r = g_drv.attribute(&ok, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
    if (r != CUDA_SUCCESS || !ok) {
        snprintf(why, len, "GPU %d does not support virtual memory management (%s)", device,
                 r != CUDA_SUCCESS ? drv_error(r) : "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0");
        return 0;
    }
    memset(&g_drv.prop, 0, sizeof g_drv.prop);
    g_drv.prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    g_drv.prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    g_drv.prop.location.id = dev;
    size_t gran = 0;
    r = g_drv.granularity(&gran, &g_drv.prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    if (r != CUDA_SUCCESS || !gran) {
        snprintf(why, len, "cuMemGetAllocationGranularity failed on GPU %d (%s)", device, drv_error(r));
        return 0;
    }
    memset(&g_drv.access, 0, sizeof g_drv.access);
    g_drv.access.location = g_drv.prop.location;
    g_drv.access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    snprintf(why, len, "virtual memory management, granularity %zu bytes", gran);
    return gran;
}

void vmm_reserve(VmmBlock *b, size_t bytes, size_t granule) {
    memset(b, 0, sizeof *b);
    b->granule = granule;
    b->n = mt_ceil_div(bytes ? bytes : 1, granule);
    CUdeviceptr p = 0;
    DRV_CHECK(g_drv.reserve(&p, b->n * granule, granule, 0, 0));
    b->base = (char *)(uintptr_t)p;
    b->mapped = (unsigned char *)mt_calloc(b->n, 1);
}

int vmm_map(VmmBlock *b, size_t g) {
    MT_CHECK(g < b->n, "vmm_map: granule %zu of a block of %zu", g, b->n);
    if (b->mapped[g]) return 0;
    CUdeviceptr p = (CUdeviceptr)(uintptr_t)(b->base + g * b->granule);
    CUmemGenericAllocationHandle h;
    CUresult r = g_drv.create(&h, b->granule, &g_drv.prop, 0);
    if (r != CUDA_SUCCESS)
        mt_check_failed(__FILE__, __LINE__, "cuMemCreate(&h, granule, &prop, 0)",
                        "CUDA driver: %s (committing a granule of %zu bytes)", drv_error(r), b->granule);
    DRV_CHECK(g_drv.map(p, b->granule, 0, h, 0));
    DRV_CHECK(g_drv.release(h)); /* the mapping keeps the memory; unmapping frees it */
    DRV_CHECK(g_drv.set_access(p, b->granule, &g_drv.access, 1));
    b->mapped[g] = 1;
    return 1;
}

int vmm_unmap(VmmBlock *b, size_t g) {
    MT_CHECK(g < b->n, "vmm_unmap: granule %zu of a block of %zu", g, b->n);
    if (!b->mapped[g]) return 0;
    DRV_CHECK(g_drv.unmap((CUdeviceptr)(uintptr_t)(b->base + g * b->granule), b->granule));
    b->mapped[g] = 0;
    return 1;
}

void vmm_free(VmmBlock *b) {
    for (size_t g = 0; g < b->n; g++) vmm_unmap(b, g);
    DRV_CHECK(g_drv.address_free((CUdeviceptr)(uintptr_t)b->base, b->n * b->granule));
    free(b->mapped);
    memset(b, 0, sizeof *b);
}

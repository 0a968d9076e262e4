/* vmm.h — CUDA virtual memory management for the table's reserve blocks (src/kernels.h: reserve,
 * commit, release): a virtual address range reserved whole (cuMemAddressReserve) whose granules
 * (the device's minimum allocation granularity, cuMemGetAllocationGranularity) are mapped to
 * physical memory one by one (cuMemCreate + cuMemMap + cuMemSetAccess) and unmapped one by one
 * (cuMemUnmap), so any granule can go back on its own while the range stays contiguous.
 * Driver entry points come through the runtime (cudaGetDriverEntryPointByVersion): nothing links
 * against libcuda, so a CUDA build still starts (and runs on the CPU) where no driver is installed.
 * Only address-space and physical-memory bookkeeping: contents (zeroing), streams, locking and
 * statistics are the caller's (cuda/core.cu). Not thread-safe: the caller holds its lock.
 * Every driver call is checked; a failure aborts with the call, the driver's message and, for
 * out-of-memory, the granule it was mapping. */
#ifndef MT_VMM_H
#define MT_VMM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct VmmBlock {
    char *base;             /* reserved range, granule-aligned, n * granule bytes */
    size_t n;               /* granules */
    size_t granule;         /* bytes per granule */
    unsigned char *mapped;  /* per granule: 1 = backed by physical memory */
} VmmBlock;

/* The granularity of device `device` (ordinal) if it supports virtual memory management, else 0
 * with the reason in why. Call once per process, after the device is set. */
size_t vmm_init(int device, char *why, size_t len);
/* Reserve ceil(bytes / granule) granules of address space, none mapped. */
void vmm_reserve(VmmBlock *b, size_t bytes, size_t granule);
/* Map granule g if it is not mapped (its contents are then undefined); 1 if it was mapped now. */
int vmm_map(VmmBlock *b, size_t g);
/* Unmap granule g if it is mapped (its physical memory goes back); 1 if it was unmapped now. The
 * caller makes sure no queued work still uses it. */
int vmm_unmap(VmmBlock *b, size_t g);
/* Unmap everything and free the address range (same precondition as vmm_unmap). */
void vmm_free(VmmBlock *b);

#ifdef __cplusplus
}
#endif

#endif

/* Keep XLA's per-step temporary buffer mapped between steps; loaded with LD_PRELOAD.
 *
 * XLA's CPU client takes all temporaries of one execution as a single posix_memalign block
 * (1.16 GB for a training step at batch 512) and frees it when the step ends. glibc serves a
 * block that large with mmap and frees it with munmap, so every step faults the pages back in
 * and the kernel zeroes them: 0.4-0.5 s of system time per step (docs/BENCHMARKS.md). Here freed
 * blocks of at least 64 MiB are kept, up to UCLUSTER_KEEP_MB MiB of them (default 4096), and the
 * next request whose size is within 25 % below a kept block's gets it back; everything else goes
 * straight to glibc. Built by scripts/install.sh, preloaded by ucluster_jax/host_tuning.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern void *__libc_memalign(size_t, size_t);
extern void *__libc_malloc(size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);

#define BIG ((size_t)64 << 20)
#define SLOTS 16

static struct { void *_Atomic p; size_t size; int idle; } slot[SLOTS];
static atomic_int tracked;                 /* slots in use: free() scans only when > 0 */
static size_t kept, limit = (size_t)-1;    /* bytes held idle; the cap, read on first use */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static int find(void *p) {
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load_explicit(&slot[i].p, memory_order_acquire) == p) return i;
  return -1;
}

int posix_memalign(void **out, size_t align, size_t size) {
  if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
  if (size < BIG) {
    void *p = __libc_memalign(align, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
  }
  pthread_mutex_lock(&mu);
  if (limit == (size_t)-1) {
    const char *mb = getenv("UCLUSTER_KEEP_MB");
    limit = (size_t)(mb ? strtoull(mb, NULL, 10) : 4096) << 20;
  }
  for (int i = 0; i < SLOTS; i++) {
    void *p = slot[i].p;
    if (p && slot[i].idle && slot[i].size >= size && slot[i].size - size <= slot[i].size / 4 &&
        (uintptr_t)p % align == 0) {
      slot[i].idle = 0;
      kept -= slot[i].size;
      pthread_mutex_unlock(&mu);
      *out = p;
      return 0;
    }
  }
  void *p = __libc_memalign(align, size);
  if (p) {
    for (int i = 0; i < SLOTS; i++)
      if (!slot[i].p) {
        slot[i].size = size;
        slot[i].idle = 0;
        atomic_store_explicit(&slot[i].p, p, memory_order_release);
        atomic_fetch_add(&tracked, 1);
        break;
      }
  }
  pthread_mutex_unlock(&mu);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

/* 1 if p was a kept block (now idle or handed back to glibc), 0 if it is not ours. */
static int release(void *p) {
  if (!p || !atomic_load_explicit(&tracked, memory_order_relaxed) || find(p) < 0) return 0;
  pthread_mutex_lock(&mu);
  int i = find(p);
  if (i < 0) {
    pthread_mutex_unlock(&mu);
    return 0;
  }
  if (kept + slot[i].size <= limit) {
    slot[i].idle = 1;
    kept += slot[i].size;
    pthread_mutex_unlock(&mu);
    return 1;
  }
  atomic_store_explicit(&slot[i].p, NULL, memory_order_release);
  atomic_fetch_sub(&tracked, 1);
  pthread_mutex_unlock(&mu);
  __libc_free(p);
  return 1;
}

void free(void *p) {
  if (!release(p)) __libc_free(p);
}

void *realloc(void *p, size_t size) {
  int i = p && atomic_load_explicit(&tracked, memory_order_relaxed) ? find(p) : -1;
  if (i < 0) return __libc_realloc(p, size);
  void *q = __libc_malloc(size);
  if (q) {
    memcpy(q, p, size < slot[i].size ? size : slot[i].size);
    release(p);
  }
  return q;
}

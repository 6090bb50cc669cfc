/* secmem.c — locked, non-dumpable memory for keys and key schedules.
 *
 * Each allocation is whole pages from mmap, mlock'ed (so it never reaches swap)
 * and marked MADV_DONTDUMP (so it is left out of core dumps).  Freeing wipes it
 * first.  If mlock fails (RLIMIT_MEMLOCK) the allocation fails: keys are never
 * silently kept in swappable memory.
 */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "klcrypt.h"

static size_t round_pages(size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (len + pg - 1) / pg * pg;
}

void klc_wipe(void *p, size_t len)
{
    if (!p || !len)
        return;
    memset(p, 0, len);
    /* keep the compiler from treating the memset as dead */
    __asm__ __volatile__("" : : "r"(p) : "memory");
}

void *klc_secure_alloc(size_t len)
{
    if (len == 0)
        len = 1;
    size_t n = round_pages(len);
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (mlock(p, n) != 0) {
        munmap(p, n);
        return NULL;
    }
    madvise(p, n, MADV_DONTDUMP);
    madvise(p, n, MADV_DONTFORK);
    return p;
}

void klc_secure_free(void *p, size_t len)
{
    if (!p)
        return;
    if (len == 0)
        len = 1;
    size_t n = round_pages(len);
    klc_wipe(p, n);
    munlock(p, n);
    munmap(p, n);
}

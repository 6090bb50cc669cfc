/* pool.c — a small persistent thread pool that splits big klc_xts_crypt calls.
 *
 * Shape: the pool is created on the first call big enough to split, with one
 * worker per usable CPU minus one (the calling thread is the last "worker").
 * A split call becomes a job of P near-equal runs of whole sectors (parts) on
 * a FIFO queue; idle workers join the oldest job that still has room for
 * helpers and claim its parts one at a time; the caller claims parts of its
 * own job too.  Parts are claimed, never assigned, so:
 *   - a caller never waits for a part nobody has started: when the pool is
 *     busy with other callers' jobs (e.g. many FUSE threads at once) the caller
 *     simply does all of its parts itself — no deadlock, no queueing delay;
 *   - a worker descheduled by a busy machine only delays the part it holds.
 * The caller returns when every part of its job is done; the job lives on the
 * caller's stack.  Workers block all signals (they go to the application's
 * threads) and are recreated lazily in a forked child (pthread_atfork), where
 * the parent's workers do not exist.
 *
 * Split threshold (klc_pool_split_min, default 64 KiB): see SPLIT_MIN_DEFAULT.
 */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "engine.h"

#define POOL_MAX 64

/* Calls below this many bytes are not split.  Measured on the 2-core Zen 4 KVM
 * guest (vaes, AES-256-XTS, 4 KiB sectors, in place; split = 2 threads, threshold
 * forced to 0; best of 40-100 short runs; scripts/bench_split.py and a C loop):
 *
 *   call size          8K    16K    32K    64K   128K   256K     1M
 *   1 thread (us)     0.7    1.3    2.4    4.8    9.5   19.7     79
 *   split, other core free (best windows, 16:49 and 18:03; "-" = no free
 *   window caught for that size):
 *                       -      -      -   1.39x  1.41x  1.82x  1.96x
 *   split, other core busy (load 7 on 2 CPUs, 18:02):
 *                   0.90x  0.51x  0.63x  0.92x  1.00x  0.99x  1.73x
 *
 * A split costs ~1 us (claiming parts, the helper's wake-up from its spin, the
 * caller waiting for the last part), so it cannot pay below ~2 x 1 us of work
 * (~32 KiB at 13 GiB/s); from 64 KiB it gains ~1.4x when a core is free and
 * loses <10% when none is.  Callers that already keep every core busy (many
 * FUSE threads) can pass max_threads = 1. */
#define SPLIT_MIN_DEFAULT ((size_t)64 << 10)
/* How long an idle worker (or a caller waiting for its helpers) polls before
 * blocking. */
#define SPIN_NS 50000u

struct job {
    const struct klc_xts *ctx;
    int encrypt;
    uint8_t *dst;
    const uint8_t *src;
    uint32_t sector_size;
    uint64_t first_tweak;
    size_t nparts, base, extra;   /* part p has base + (p < extra) sectors */
    size_t next;                  /* next part to claim */
    size_t finished;              /* parts done */
    int helpers, max_helpers;
    int waiting;                  /* the caller sleeps on P.done */
    int rc;                       /* first error */
    struct job *link;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work;          /* workers wait here for jobs */
    pthread_cond_t done;          /* callers wait here for helpers' parts */
    struct job *head;
    int started;                  /* workers created in this process */
    int nworkers;                 /* workers running */
    int sleeping;                 /* workers blocked in pthread_cond_wait */
    int queued;                   /* jobs on the queue (atomic: read while spinning) */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
       NULL, 0, 0, 0, 0};

static size_t split_min = SPLIT_MIN_DEFAULT;
static int pool_size;             /* threads incl. the caller */
static pthread_once_t size_once = PTHREAD_ONCE_INIT;

static void compute_size(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) < n)
        n = CPU_COUNT(&set);
    if (n < 1)
        n = 1;
    if (n > POOL_MAX)
        n = POOL_MAX;
    pool_size = (int)n;
}

int klc_pool_threads(void)
{
    pthread_once(&size_once, compute_size);
    return pool_size;
}

size_t klc_pool_split_min(void) { return __atomic_load_n(&split_min, __ATOMIC_RELAXED); }

void klc_pool_set_split_min(size_t bytes)
{
    __atomic_store_n(&split_min, bytes, __ATOMIC_RELAXED);
}

static int run_part(struct job *j, size_t p)
{
    size_t first = p * j->base + (p < j->extra ? p : j->extra);
    size_t n = j->base + (p < j->extra);
    size_t off = first * j->sector_size;
    return j->ctx->ops->crypt(j->ctx, j->encrypt, j->dst + off, j->src + off, n,
                              j->sector_size,
                              j->first_tweak + (uint64_t)first * (j->sector_size / 512));
}

/* With P.mu held: the next unclaimed part of j, or -1.  A job leaves the
 * queue when its last part is claimed. */
static long claim(struct job *j)
{
    if (j->next >= j->nparts)
        return -1;
    long p = (long)j->next++;
    if (j->next == j->nparts) {
        for (struct job **q = &P.head; *q; q = &(*q)->link)
            if (*q == j) {
                *q = j->link;
                __atomic_store_n(&P.queued, P.queued - 1, __ATOMIC_RELAXED);
                break;
            }
    }
    return p;
}

/* With P.mu held: do parts of j until none is left to claim.  Must not touch
 * j after the last finished part is counted and the lock released (the
 * caller's stack frame may be gone). */
static void work_on(struct job *j)
{
    long p;
    while ((p = claim(j)) >= 0) {
        pthread_mutex_unlock(&P.mu);
        int rc = run_part(j, (size_t)p);
        pthread_mutex_lock(&P.mu);
        if (rc != KLC_OK && j->rc == KLC_OK)
            j->rc = rc;
        __atomic_store_n(&j->finished, j->finished + 1, __ATOMIC_RELEASE);
        if (j->finished == j->nparts && j->waiting)
            pthread_cond_broadcast(&P.done);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

static void *worker(void *arg)
{
    (void)arg;
    int spun = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        struct job *j = P.head;
        while (j && j->helpers >= j->max_helpers)
            j = j->link;
        if (!j && !spun) {
            /* Spin a little before sleeping: the next request usually comes
             * within microseconds, and waking a sleeping thread costs far
             * more than that on a VM (futex wake + IPI + vCPU scheduling).
             * A queued job that wants no more helpers ends the spin too. */
            pthread_mutex_unlock(&P.mu);
            uint64_t t0 = now_ns();
            while (!__atomic_load_n(&P.queued, __ATOMIC_RELAXED) && now_ns() - t0 < SPIN_NS)
                cpu_relax();
            pthread_mutex_lock(&P.mu);
            spun = 1;
            continue;
        }
        if (!j) {
            P.sleeping++;
            pthread_cond_wait(&P.work, &P.mu);
            P.sleeping--;
            spun = 0;
            continue;
        }
        j->helpers++;
        work_on(j);
        spun = 0;
    }
    return NULL;
}

static void atfork_prepare(void) { pthread_mutex_lock(&P.mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&P.mu); }
static void atfork_child(void)
{
    /* Only the forking thread exists here: no workers, no other callers. */
    P.head = NULL;
    P.started = 0;
    P.nworkers = 0;
    pthread_cond_init(&P.work, NULL);
    pthread_cond_init(&P.done, NULL);
    pthread_mutex_unlock(&P.mu);
}

/* With P.mu held. */
static void start_workers(void)
{
    static int atfork_done;
    P.started = 1;
    if (!atfork_done && pthread_atfork(atfork_prepare, atfork_parent, atfork_child) == 0)
        atfork_done = 1;
    int want = klc_pool_threads() - 1;
    pthread_attr_t attr;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < want; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, NULL) != 0)
            break;   /* fewer helpers; callers still do their own work */
        pthread_setname_np(t, "klc-xts");
        P.nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

int klc_pool_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                   const uint8_t *src, size_t nsec, uint32_t sector_size,
                   uint64_t first_tweak, int max_threads)
{
    size_t len = nsec * sector_size;
    size_t smin = klc_pool_split_min();
    int n = klc_pool_threads();
    if (max_threads > 0 && max_threads < n)
        n = max_threads;
    if (n <= 1 || nsec < 2 || len < smin)
        return ctx->ops->crypt(ctx, encrypt, dst, src, nsec, sector_size, first_tweak);

    /* Parts of at least smin/2 bytes, between n and 4n of them (more parts
     * than threads balance the load when a core is busy elsewhere). */
    size_t grain = smin / 2 ? smin / 2 : 1;
    size_t nparts = len / grain;
    if (nparts < (size_t)n)
        nparts = (size_t)n;
    if (nparts > 4 * (size_t)n)
        nparts = 4 * (size_t)n;
    if (nparts > nsec)
        nparts = nsec;

    struct job j = {
        .ctx = ctx, .encrypt = encrypt, .dst = dst, .src = src,
        .sector_size = sector_size, .first_tweak = first_tweak,
        .nparts = nparts, .base = nsec / nparts, .extra = nsec % nparts,
        .max_helpers = n - 1, .rc = KLC_OK,
    };
    pthread_mutex_lock(&P.mu);
    if (!P.started)
        start_workers();
    if (P.nworkers == 0) {
        pthread_mutex_unlock(&P.mu);
        return ctx->ops->crypt(ctx, encrypt, dst, src, nsec, sector_size, first_tweak);
    }
    struct job **q = &P.head;
    while (*q)
        q = &(*q)->link;
    *q = &j;
    __atomic_store_n(&P.queued, P.queued + 1, __ATOMIC_RELAXED);
    /* spinning workers see P.queued; wake sleeping ones only if needed */
    int wake = j.max_helpers < P.sleeping ? j.max_helpers : P.sleeping;
    if ((size_t)wake > nparts - 1)
        wake = (int)(nparts - 1);
    for (int i = 0; i < wake; i++)
        pthread_cond_signal(&P.work);
    work_on(&j);                      /* the caller's share (or all of it) */
    if (j.finished < j.nparts) {
        /* helpers are finishing parts they already hold: spin briefly */
        pthread_mutex_unlock(&P.mu);
        uint64_t t0 = now_ns();
        while (__atomic_load_n(&j.finished, __ATOMIC_ACQUIRE) < j.nparts &&
               now_ns() - t0 < SPIN_NS)
            cpu_relax();
        pthread_mutex_lock(&P.mu);
        j.waiting = 1;
        while (j.finished < j.nparts)
            pthread_cond_wait(&P.done, &P.mu);
    }
    pthread_mutex_unlock(&P.mu);
    return j.rc;
}

/* plane.c — the plane's lifecycle and shared state: configuration, the
 * serving threads (spawned by the transport, joined here), the locked state
 * (the engine context handed out per request, taken back by klc_plane_lock)
 * and the range locks of writes.
 *
 * Locked state: klc_plane_lock takes the context away; requests that need it
 * park in klc_ctx_get (at most lock_timeout_ms, then EIO) until
 * klc_plane_unlock installs a new one.  klc_plane_lock returns only when no
 * request still uses the old context, so the caller may free it.
 *
 * Range locks: a write holds its sectors [first, last] while it reads,
 * merges, encrypts and writes them, so two writes into the same sector
 * (partial-sector read-modify-write) never lose each other's bytes.  Reads
 * take no range lock: like a disk, a read concurrent with a write of the same
 * sector sees either version of each sector.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "plane_internal.h"

void klc_deadline_after(struct timespec *ts, uint32_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* ---- the engine context and the locked state --------------------------- */

/* Take the engine context for one request; parks while the plane is locked,
 * at most lock_timeout_ms.  NULL = timed out. */
klc_xts *klc_ctx_get(klc_plane *p)
{
    pthread_mutex_lock(&p->mu);
    if (p->locked) {
        struct timespec dl;
        klc_deadline_after(&dl, p->cfg.lock_timeout_ms);
        while (p->locked) {
            if (pthread_cond_timedwait(&p->unlocked, &p->mu, &dl) == ETIMEDOUT && p->locked) {
                pthread_mutex_unlock(&p->mu);
                ADD(lock_timeouts, 1);
                return NULL;
            }
        }
    }
    p->ctx_users++;
    klc_xts *c = p->ctx;
    pthread_mutex_unlock(&p->mu);
    return c;
}

void klc_ctx_put(klc_plane *p)
{
    pthread_mutex_lock(&p->mu);
    if (--p->ctx_users == 0 && p->locked)
        pthread_cond_broadcast(&p->drained);
    pthread_mutex_unlock(&p->mu);
}

/* An engine call failed with ctx c.  Returns 1 if the request should wait for
 * a new context and be redone, 0 if it gets EIO. */
int klc_ctx_failed(klc_plane *p, klc_xts *c, int rc)
{
    ADD(engine_errors, 1);
    if (rc != KLC_ERR_KEYLOCKER)
        return 0;
    pthread_mutex_lock(&p->mu);
    p->key_failed = 1;
    int retry = p->cfg.lock_on_key_failure;
    if (retry && p->ctx == c)   /* first to notice: lock; Python hands in a new ctx */
        p->locked = 1;
    pthread_mutex_unlock(&p->mu);
    return retry;
}

int klc_plane_lock(klc_plane *p, klc_xts **old)
{
    if (!p || !old)
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    p->locked = 1;
    while (p->ctx_users > 0)
        pthread_cond_wait(&p->drained, &p->mu);
    *old = p->ctx;
    p->ctx = NULL;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int klc_plane_unlock(klc_plane *p, klc_xts *ctx)
{
    if (!p || !ctx)
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    if (p->ctx && p->ctx != ctx && !p->locked) {
        pthread_mutex_unlock(&p->mu);
        return -EBUSY;     /* still unlocked with another context: lock first */
    }
    if (p->locked) {
        /* lock_on_key_failure locked without taking the context away: wait
         * for its users, then drop it (the caller still owns and frees it). */
        while (p->ctx_users > 0)
            pthread_cond_wait(&p->drained, &p->mu);
    }
    p->ctx = ctx;
    p->locked = 0;
    p->key_failed = 0;
    pthread_cond_broadcast(&p->unlocked);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* ---- range locks --------------------------------------------------------- */

void klc_range_lock(klc_plane *p, struct range *r)
{
    pthread_mutex_lock(&p->rmu);
    for (;;) {
        struct range *q = p->ranges;
        while (q && (q->last < r->first || q->first > r->last))
            q = q->next;
        if (!q)
            break;
        pthread_cond_wait(&p->rcv, &p->rmu);
    }
    r->next = p->ranges;
    p->ranges = r;
    pthread_mutex_unlock(&p->rmu);
}

void klc_range_unlock(klc_plane *p, struct range *r)
{
    pthread_mutex_lock(&p->rmu);
    for (struct range **q = &p->ranges; *q; q = &(*q)->next)
        if (*q == r) {
            *q = r->next;
            break;
        }
    pthread_cond_broadcast(&p->rcv);
    pthread_mutex_unlock(&p->rmu);
}

/* ---- threads ------------------------------------------------------------- */

struct spawn_arg {
    klc_plane *p;
    void *(*fn)(void *);
    void *arg;
    char name[16];
};

static void *thread_main(void *a)
{
    struct spawn_arg sa = *(struct spawn_arg *)a;
    free(a);
    pthread_setname_np(pthread_self(), sa.name);
    void *r = sa.fn(sa.arg);
    klc_plane *p = sa.p;
    pthread_mutex_lock(&p->mu);
    p->running--;
    pthread_cond_broadcast(&p->ended);
    pthread_mutex_unlock(&p->mu);
    return r;
}

int klc_plane_spawn(klc_plane *p, const char *name, void *(*fn)(void *), void *arg)
{
    if (p->nspawned >= KLC_PLANE_MAX_THREADS)
        return -EAGAIN;
    struct spawn_arg *sa = malloc(sizeof *sa);
    if (!sa)
        return -ENOMEM;
    sa->p = p;
    sa->fn = fn;
    sa->arg = arg;
    snprintf(sa->name, sizeof sa->name, "%s", name);
    /* Serving threads run with every signal blocked: signals go to Python's thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_mutex_lock(&p->mu);
    p->running++;
    pthread_mutex_unlock(&p->mu);
    int e = pthread_create(&p->tids[p->nspawned], NULL, thread_main, sa);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        pthread_mutex_lock(&p->mu);
        p->running--;
        pthread_mutex_unlock(&p->mu);
        free(sa);
        return -e;
    }
    p->nspawned++;
    return 0;
}

void klc_plane_session(klc_plane *p, struct klc_session_info *out)
{
    out->fuse_fd = p->cfg.fuse_fd;
    out->nthreads = p->cfg.nthreads;
    out->max_write = p->max_write;
    out->proto_minor = p->proto_minor;
    out->kernel_flags = p->kernel_flags;
    out->granted_flags = p->granted_flags;
}

void klc_plane_reply_failed(klc_plane *p)
{
    ADD(reply_errors, 1);
}

/* ---- lifecycle ----------------------------------------------------------- */

/* An O_DIRECT descriptor of the backing store.  Every backing transfer of the
 * plane is whole sectors at data_offset + k * sector_size, from/to page-aligned
 * buffers (the core's sector buffers; a transport's reply buffers must be page
 * aligned too), so O_DIRECT works whenever the backing accepts sector-aligned
 * offsets and lengths: a 512-byte-sector volume on a 4096-byte-sector disk
 * does not.  Rather than reason about each filesystem's alignment rules, one
 * probe read of a sector at data_offset tells.
 *
 * The plane opens its own open file description of the same file through
 * /proc/self/fd (checked to be the same device and inode) instead of setting
 * O_DIRECT on the caller's: that one is shared with whoever passed it (the
 * `klcrypt open` process, header reads through the same handle), whose small
 * unaligned reads O_DIRECT would break.  Its own description also keeps its
 * own errseq cursor: the control plane's fdatasync of the caller's descriptor
 * cannot consume a writeback error before the plane's FSYNC sees it.  No path
 * lookup happens: the magic link names the open file, not a directory entry.
 * For a block device the new description is not O_EXCL; the caller's keeps
 * the exclusive claim.
 * Returns the descriptor, -1 = stays buffered (auto), or -errno = refused. */
static int backing_open_direct(const struct klc_plane_config *cfg)
{
    int fd = -1, e = 0;
    char path[64];
    struct stat a, b;
    snprintf(path, sizeof path, "/proc/self/fd/%d", cfg->backing_fd);
    if (fstat(cfg->backing_fd, &a) != 0)
        return -errno;
    fd = open(path, (cfg->read_only ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        e = errno;
    } else if (fstat(fd, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino ||
               a.st_rdev != b.st_rdev) {
        e = ESTALE;                  /* not the same file: never use it */
    } else {
        void *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED) {
            e = ENOMEM;
        } else {
            ssize_t r;
            do
                r = pread(fd, buf, cfg->sector_size, (off_t)cfg->data_offset);
            while (r < 0 && errno == EINTR);
            e = r < 0 ? errno : 0;
            munmap(buf, 4096);
        }
    }
    if (e == 0)
        return fd;
    if (fd >= 0)
        close(fd);
    return cfg->backing_io == KLC_BACKING_AUTO ? -1 : -e;
}

static const struct klc_transport *transport_of(int kind)
{
    switch (kind) {
    case KLC_TRANSPORT_DEV:
        return &klc_transport_dev;
    case KLC_TRANSPORT_SOCKET:
        return &klc_transport_socket;
    case KLC_TRANSPORT_URING:
        return &klc_transport_uring;     /* NULL unless an io_uring transport is linked in */
    case KLC_TRANSPORT_AUTO:             /* ask for io_uring at INIT; see klc_plane_start */
        return &klc_transport_uring ? &klc_transport_uring : &klc_transport_dev;
    default:
        return NULL;
    }
}

int klc_plane_new(const struct klc_plane_config *cfg, klc_xts *ctx, klc_plane **out)
{
    if (!cfg || !ctx || !out)
        return -EINVAL;
    uint32_t ss = cfg->sector_size;
    if (ss < 512 || ss > 4096 || (ss & (ss - 1)) || cfg->size % ss || cfg->size == 0 ||
        cfg->nthreads < 1 || cfg->nthreads > KLC_PLANE_MAX_THREADS ||
        cfg->max_write < 4096 || cfg->max_write > KLC_PLANE_MAX_WRITE ||
        cfg->fuse_fd < 0 || cfg->backing_fd < 0 ||
        cfg->transport < KLC_TRANSPORT_DEV || cfg->transport > KLC_TRANSPORT_AUTO ||
        cfg->backing_io < KLC_BACKING_BUFFERED || cfg->backing_io > KLC_BACKING_AUTO)
        return -EINVAL;
    const struct klc_transport *tp = transport_of(cfg->transport);
    if (!tp)
        return -EOPNOTSUPP;
    if (cfg->transport == KLC_TRANSPORT_SOCKET) {
        struct stat sb;
        if (fstat(cfg->fuse_fd, &sb) != 0 || !S_ISSOCK(sb.st_mode))
            return -EINVAL;
    }
    int dfd = -1;
    if (cfg->backing_io != KLC_BACKING_BUFFERED) {
        dfd = backing_open_direct(cfg);
        if (dfd < -1)
            return dfd;
    }
    klc_plane *p = calloc(1, sizeof *p);
    if (!p) {
        if (dfd >= 0)
            close(dfd);
        return -ENOMEM;
    }
    p->cfg = *cfg;
    p->backing_direct = dfd >= 0;
    p->bfd = dfd >= 0 ? dfd : cfg->backing_fd;
    p->tp = tp;
    p->size = cfg->size;
    p->allow_discards = !!cfg->allow_discards;
    struct stat bsb;
    p->backing_blk = fstat(cfg->backing_fd, &bsb) == 0 && S_ISBLK(bsb.st_mode);
    p->ctx = ctx;
    p->mode = cfg->mode & 07777;
    p->uid = cfg->uid;
    p->gid = cfg->gid;
    clock_gettime(CLOCK_REALTIME, &p->mtime);
    p->ctime_ = p->mtime;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->rmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->unlocked, &ca);
    pthread_cond_init(&p->drained, &ca);
    pthread_cond_init(&p->rcv, &ca);
    pthread_cond_init(&p->ended, &ca);
    pthread_condattr_destroy(&ca);
    *out = p;
    return 0;
}

/* Threads the transport spawned before a failure keep serving until unmount;
 * the caller unmounts, then klc_plane_wait joins them and stops the transport. */
int klc_plane_start(klc_plane *p)
{
    if (!p || !p->initialized || p->tp_started || p->nspawned)
        return -EINVAL;
    /* auto: the transport asked for its INIT flags; without them, /dev/fuse */
    if (p->cfg.transport == KLC_TRANSPORT_AUTO &&
        (p->granted_flags & p->tp->init_flags) != p->tp->init_flags)
        p->tp = &klc_transport_dev;
    int rc = p->tp->start(p, &p->tp_state);
    if (rc == 0 || p->nspawned > 0)
        p->tp_started = 1;      /* stop() is owed after the join */
    return rc;
}

int klc_plane_wait(klc_plane *p, int timeout_ms)
{
    if (!p)
        return 1;
    struct timespec dl;
    klc_deadline_after(&dl, timeout_ms < 0 ? 0 : (uint32_t)timeout_ms);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0) {
        if (pthread_cond_timedwait(&p->ended, &p->mu, &dl) == ETIMEDOUT && p->running > 0) {
            pthread_mutex_unlock(&p->mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nspawned; i++)
        pthread_join(p->tids[i], NULL);
    p->nspawned = 0;
    if (p->tp_started) {
        p->tp->stop(p, p->tp_state);
        p->tp_state = NULL;
        p->tp_started = 0;
    }
    return 1;
}

void klc_plane_stats(klc_plane *p, struct klc_plane_stats *out)
{
    if (!p || !out)
        return;
    memset(out, 0, sizeof *out);
    uint64_t *src = (uint64_t *)&p->st, *dst = (uint64_t *)out;
    size_t n64 = offsetof(struct klc_plane_stats, locked) / sizeof(uint64_t);
    for (size_t i = 0; i < n64; i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    pthread_mutex_lock(&p->mu);
    out->locked = p->locked;
    out->key_failed = p->key_failed;
    out->threads = p->running;
    pthread_mutex_unlock(&p->mu);
    out->proto_minor = p->proto_minor;
    out->max_write = p->max_write;
    snprintf(out->transport, sizeof out->transport, "%s", p->tp->name);
    out->wb_errno = __atomic_load_n(&p->wb_err, __ATOMIC_RELAXED);
    out->size = klc_size(p);
    out->allow_discards = __atomic_load_n(&p->allow_discards, __ATOMIC_RELAXED);
    out->backing_direct = p->backing_direct;
}

int klc_plane_set_size(klc_plane *p, uint64_t new_size)
{
    if (!p || new_size == 0 || new_size % p->cfg.sector_size || new_size > (uint64_t)INT64_MAX)
        return -EINVAL;
    uint64_t old = __atomic_exchange_n(&p->size, new_size, __ATOMIC_ACQ_REL);
    if (!p->initialized || old == new_size)
        return 0;
    /* growing: only the attributes are stale; shrinking: so are cached pages past the end */
    return klc_session_inval(p, new_size < old ? (int64_t)new_size : -1, 0);
}

int klc_plane_set_discards(klc_plane *p, int on)
{
    if (!p)
        return -EINVAL;
    __atomic_store_n(&p->allow_discards, !!on, __ATOMIC_RELEASE);
    return 0;
}

void klc_plane_free(klc_plane *p)
{
    if (!p)
        return;
    if (!klc_plane_wait(p, 0))
        return;     /* threads still running: leak rather than free under them */
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->rmu);
    pthread_cond_destroy(&p->unlocked);
    pthread_cond_destroy(&p->drained);
    pthread_cond_destroy(&p->rcv);
    pthread_cond_destroy(&p->ended);
    if (p->bfd != p->cfg.backing_fd)
        close(p->bfd);
    free(p);
}

/* plane.c — klcrypt's data plane: the FUSE request loop of the one-file
 * filesystem, the volume maths (sectors, read-modify-write, range locks) and
 * the locked state.
 *
 * Shape: N worker threads, each blocked in read(2) on its own /dev/fuse
 * descriptor (the session's, or a clone made with FUSE_DEV_IOC_CLONE, so the
 * kernel hands requests to whichever thread is idle and each answers on the
 * descriptor it read from).  One request = at most one backing pread (reads,
 * or the partial head/tail sectors of a write) + one engine call over all its
 * sectors + one backing pwrite.  No caching here: the kernel's page cache is
 * the only cache (write-through: no FUSE_WRITEBACK_CACHE), and FSYNC/FLUSH
 * reach the backing store as fdatasync.
 *
 * Contract of every answer: each request is answered exactly once, except
 * FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY which the kernel expects no
 * answer to; unknown opcodes get ENOSYS.  read() on /dev/fuse: ENOENT = the
 * kernel aborted that request (retry), ENODEV = unmounted (the thread ends).
 *
 * Security contract: if the engine fails (KLC_ERR_KEYLOCKER from a dead Key
 * Locker handle, ...) the buffer it produced is never written to the backing
 * store nor returned to the reader: the request gets EIO (or, with
 * lock_on_key_failure, waits for a new context and is redone).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "klcrypt.h"
#include "plane.h"

#define ADD(field, v) __atomic_add_fetch(&p->st.field, (v), __ATOMIC_RELAXED)

/* A write's sectors [first, last], held while it read-modify-writes them. */
struct range {
    uint64_t first, last;
    struct range *next;
};

struct worker {
    klc_plane *p;
    int fd;                /* own /dev/fuse descriptor (clone) or the session's */
    int own_fd;            /* 1 if fd is a clone this worker closes */
    pthread_t tid;
    uint8_t *req;          /* request buffer: header + args + up to max_write bytes */
    size_t req_len;
    uint8_t *data;         /* sector buffer: max_write + 2 sectors, page aligned */
    size_t data_len;
};

struct klc_plane {
    struct klc_plane_config cfg;
    uint32_t max_write;       /* negotiated */
    uint32_t proto_minor;
    int initialized;

    /* context + locked state */
    pthread_mutex_t mu;
    pthread_cond_t unlocked;  /* parked requests wait here */
    pthread_cond_t drained;   /* klc_plane_lock waits for ctx_users == 0 */
    klc_xts *ctx;
    int locked;
    int ctx_users;
    int key_failed;

    /* range locks of writes */
    pthread_mutex_t rmu;
    pthread_cond_t rcv;
    struct range *ranges;

    /* attributes that SETATTR may change (under mu) */
    uint32_t mode, uid, gid;
    struct timespec mtime, ctime_;

    /* workers */
    struct worker *w;
    int nworkers;
    int running;              /* under mu */
    pthread_cond_t ended;

    struct klc_plane_stats st;  /* counters, updated with atomics */
};

/* ---- mount ----------------------------------------------------------- */

int klc_fuse_mount(const char *source, const char *target, const char *options,
                   unsigned long flags, int *fd_out)
{
    struct stat sb;
    if (!target || !fd_out)
        return -EINVAL;
    if (stat(target, &sb) != 0)
        return -errno;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    char opts[1024];
    int n = snprintf(opts, sizeof opts, "fd=%d,rootmode=%o,user_id=%u,group_id=%u%s%s",
                     fd, sb.st_mode & S_IFMT, (unsigned)getuid(), (unsigned)getgid(),
                     options && *options ? "," : "", options ? options : "");
    if (n < 0 || (size_t)n >= sizeof opts) {
        close(fd);
        return -EINVAL;
    }
    if (mount(source ? source : "klcrypt", target, "fuse.klcrypt", flags, opts) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    *fd_out = fd;
    return 0;
}

/* ---- small helpers ----------------------------------------------------- */

static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;        /* backing store shorter than the volume */
        done += (size_t)r;
    }
    return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (size_t)r;
    }
    return 0;
}

static void deadline_after(struct timespec *ts, uint32_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Take the engine context for one request; parks while the plane is locked,
 * at most lock_timeout_ms.  NULL = timed out. */
static klc_xts *ctx_get(klc_plane *p)
{
    pthread_mutex_lock(&p->mu);
    if (p->locked) {
        struct timespec dl;
        deadline_after(&dl, p->cfg.lock_timeout_ms);
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

static void ctx_put(klc_plane *p)
{
    pthread_mutex_lock(&p->mu);
    if (--p->ctx_users == 0 && p->locked)
        pthread_cond_broadcast(&p->drained);
    pthread_mutex_unlock(&p->mu);
}

/* An engine call failed with ctx c.  Returns 1 if the request should wait for
 * a new context and be redone, 0 if it gets EIO. */
static int ctx_failed(klc_plane *p, klc_xts *c, int rc)
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

static void range_lock(klc_plane *p, struct range *r)
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

static void range_unlock(klc_plane *p, struct range *r)
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

/* ---- replies ----------------------------------------------------------- */

static void reply(struct worker *w, uint64_t unique, int err, const void *a, size_t alen,
                  const void *b, size_t blen)
{
    struct fuse_out_header oh = {.len = (uint32_t)(sizeof oh + alen + blen),
                                 .error = err, .unique = unique};
    struct iovec iov[3] = {{&oh, sizeof oh}, {(void *)a, alen}, {(void *)b, blen}};
    int n = 1 + (alen > 0) + (blen > 0);
    if (alen == 0)
        iov[1] = iov[2];
    ssize_t r;
    do
        r = writev(w->fd, iov, n);
    while (r < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted/aborted meanwhile; nothing to do. */
    if (r < 0 && errno != ENOENT) {
        klc_plane *p = w->p;
        ADD(reply_errors, 1);
    }
}

static void reply_err(struct worker *w, uint64_t unique, int err)
{
    reply(w, unique, -err, NULL, 0, NULL, 0);
}

static void fill_attr(klc_plane *p, struct fuse_attr *a)
{
    memset(a, 0, sizeof *a);
    a->ino = FUSE_ROOT_ID;
    a->size = p->cfg.size;
    a->blocks = p->cfg.size / 512;
    pthread_mutex_lock(&p->mu);
    a->mode = S_IFREG | (p->mode & 07777);
    a->uid = p->uid;
    a->gid = p->gid;
    a->mtime = a->atime = (uint64_t)p->mtime.tv_sec;
    a->mtimensec = a->atimensec = (uint32_t)p->mtime.tv_nsec;
    a->ctime = (uint64_t)p->ctime_.tv_sec;
    a->ctimensec = (uint32_t)p->ctime_.tv_nsec;
    pthread_mutex_unlock(&p->mu);
    a->nlink = 1;
    a->blksize = p->cfg.sector_size > 4096 ? p->cfg.sector_size : 4096;
}

static void reply_attr(struct worker *w, uint64_t unique)
{
    struct fuse_attr_out out;
    memset(&out, 0, sizeof out);
    /* The size never changes behind the kernel's back: let it cache the
     * attributes, so reads need no GETATTR. */
    out.attr_valid = 3600;
    fill_attr(w->p, &out.attr);
    reply(w, unique, 0, &out, sizeof out, NULL, 0);
}

/* ---- READ / WRITE -------------------------------------------------------- */

static void do_read(struct worker *w, uint64_t unique, const struct fuse_read_in *in)
{
    klc_plane *p = w->p;
    const uint64_t ss = p->cfg.sector_size;
    uint64_t off = in->offset, len = in->size;
    if (off >= p->cfg.size || len == 0) {
        reply(w, unique, 0, NULL, 0, NULL, 0);       /* EOF: short (empty) read */
        return;
    }
    if (len > p->cfg.size - off)
        len = p->cfg.size - off;                     /* short read at the end */
    uint64_t s0 = off / ss, s1 = (off + len - 1) / ss;
    size_t nbytes = (size_t)((s1 - s0 + 1) * ss);
    if (nbytes > w->data_len) {
        reply_err(w, unique, EINVAL);
        return;
    }
    int rc = pread_full(p->cfg.backing_fd, w->data, nbytes, p->cfg.data_offset + s0 * ss);
    if (rc < 0) {
        ADD(read_errors, 1);
        reply_err(w, unique, -rc);
        return;
    }
    for (;;) {
        klc_xts *c = ctx_get(p);
        if (!c) {
            reply_err(w, unique, EIO);
            return;
        }
        rc = klc_xts_crypt(c, 0, w->data, w->data, nbytes, (uint32_t)ss,
                           p->cfg.iv_tweak + s0 * (ss / 512), p->cfg.engine_threads);
        ctx_put(p);
        if (rc == KLC_OK)
            break;
        if (!ctx_failed(p, c, rc)) {
            reply_err(w, unique, EIO);   /* never return what a failed engine produced */
            return;
        }
        /* the buffer may be garbage now: read the ciphertext again */
        rc = pread_full(p->cfg.backing_fd, w->data, nbytes, p->cfg.data_offset + s0 * ss);
        if (rc < 0) {
            ADD(read_errors, 1);
            reply_err(w, unique, -rc);
            return;
        }
    }
    ADD(reads, 1);
    ADD(read_bytes, len);
    reply(w, unique, 0, w->data + (off - s0 * ss), (size_t)len, NULL, 0);
}

/* Returns 0 or a positive errno. */
static int write_sectors(struct worker *w, uint64_t off, uint64_t len, const uint8_t *src)
{
    klc_plane *p = w->p;
    const uint64_t ss = p->cfg.sector_size;
    uint64_t s0 = off / ss, s1 = (off + len - 1) / ss;
    size_t nbytes = (size_t)((s1 - s0 + 1) * ss);
    size_t head = (size_t)(off - s0 * ss);
    size_t tail_end = (size_t)(off + len - s0 * ss);  /* end of new data in the buffer */
    int partial_head = head != 0;
    int partial_tail = tail_end != nbytes;
    uint64_t base = p->cfg.data_offset + s0 * ss;
    uint64_t tweak = p->cfg.iv_tweak + s0 * (ss / 512);
    uint8_t *buf = w->data;
    int rc;

    if (nbytes > w->data_len)
        return EINVAL;
    struct range r = {.first = s0, .last = s1};
    range_lock(p, &r);
    for (;;) {
        klc_xts *c = ctx_get(p);
        if (!c) {
            rc = -EIO;
            break;
        }
        if (partial_head || partial_tail) {
            /* Read-modify-write of the partial first/last sector, under the range lock. */
            ADD(rmw, 1);
            rc = 0;
            if (partial_head)
                rc = pread_full(p->cfg.backing_fd, buf, ss, base);
            if (rc == 0 && partial_tail && !(partial_head && s0 == s1))
                rc = pread_full(p->cfg.backing_fd, buf + nbytes - ss, ss, base + nbytes - ss);
            if (rc < 0) {
                ctx_put(p);
                ADD(read_errors, 1);
                break;
            }
            if (partial_head)
                rc = klc_xts_crypt(c, 0, buf, buf, ss, (uint32_t)ss, tweak, 1);
            if (rc == KLC_OK && partial_tail && !(partial_head && s0 == s1))
                rc = klc_xts_crypt(c, 0, buf + nbytes - ss, buf + nbytes - ss, ss, (uint32_t)ss,
                                   tweak + (nbytes / ss - 1) * (ss / 512), 1);
            if (rc == KLC_OK) {
                /* Merge only the partial sectors; the whole sectors between them are
                 * encrypted straight from the request (no copy of the payload).  A
                 * 1 MiB write from a buffer that is not page aligned arrives as two
                 * requests with a partial sector each, so this path is common. */
                if (s0 == s1) {
                    memcpy(buf + head, src, (size_t)len);
                    rc = klc_xts_crypt(c, 1, buf, buf, ss, (uint32_t)ss, tweak, 1);
                } else {
                    size_t mid0 = partial_head ? ss : 0;               /* buffer offsets */
                    size_t mid1 = partial_tail ? nbytes - ss : nbytes;
                    if (partial_head)
                        memcpy(buf + head, src, ss - head);
                    if (partial_tail)
                        memcpy(buf + mid1, src + (mid1 - head), tail_end - mid1);
                    if (partial_head)
                        rc = klc_xts_crypt(c, 1, buf, buf, ss, (uint32_t)ss, tweak, 1);
                    if (rc == KLC_OK && mid1 > mid0)
                        rc = klc_xts_crypt(c, 1, buf + mid0, src + (mid0 - head), mid1 - mid0,
                                           (uint32_t)ss, tweak + mid0 / ss * (ss / 512),
                                           p->cfg.engine_threads);
                    if (rc == KLC_OK && partial_tail)
                        rc = klc_xts_crypt(c, 1, buf + mid1, buf + mid1, ss, (uint32_t)ss,
                                           tweak + mid1 / ss * (ss / 512), 1);
                }
            }
        } else {
            /* Whole sectors: encrypt straight from the request into the buffer. */
            rc = klc_xts_crypt(c, 1, buf, src, nbytes, (uint32_t)ss, tweak,
                               p->cfg.engine_threads);
        }
        ctx_put(p);
        if (rc == KLC_OK) {
            rc = pwrite_full(p->cfg.backing_fd, buf, nbytes, base);
            if (rc < 0)
                ADD(write_errors, 1);
            break;
        }
        if (!ctx_failed(p, c, rc)) {
            rc = -EIO;           /* nothing the failed engine produced is written */
            break;
        }
    }
    range_unlock(p, &r);
    return rc < 0 ? -rc : 0;
}

static void do_write(struct worker *w, uint64_t unique, const struct fuse_write_in *in,
                     const uint8_t *data, size_t avail)
{
    klc_plane *p = w->p;
    uint64_t off = in->offset, len = in->size;
    if (len > avail) {
        reply_err(w, unique, EINVAL);
        return;
    }
    if (p->cfg.read_only) {
        reply_err(w, unique, EROFS);
        return;
    }
    struct fuse_write_out out = {0};
    if (len == 0) {
        reply(w, unique, 0, &out, sizeof out, NULL, 0);
        return;
    }
    if (off >= p->cfg.size) {
        reply_err(w, unique, ENOSPC);    /* like a block device: no room past the end */
        return;
    }
    if (len > p->cfg.size - off)
        len = p->cfg.size - off;         /* short write up to the end */
    int err = write_sectors(w, off, len, data);
    if (err) {
        reply_err(w, unique, err);
        return;
    }
    ADD(writes, 1);
    ADD(written_bytes, len);
    out.size = (uint32_t)len;
    reply(w, unique, 0, &out, sizeof out, NULL, 0);
}

static void do_sync(struct worker *w, uint64_t unique)
{
    klc_plane *p = w->p;
    if (p->cfg.read_only) {
        reply_err(w, unique, 0);
        return;
    }
    if (fdatasync(p->cfg.backing_fd) != 0) {
        int e = errno;
        ADD(sync_errors, 1);
        reply_err(w, unique, e);
        return;
    }
    ADD(syncs, 1);
    reply_err(w, unique, 0);
}

static void do_setattr(struct worker *w, uint64_t unique, const struct fuse_setattr_in *in)
{
    klc_plane *p = w->p;
    /* The file stands for a block device: its size is fixed.  Truncation
     * (O_TRUNC, truncate(2)) is ignored like on a block device; the reply
     * carries the real size, which the kernel adopts. */
    pthread_mutex_lock(&p->mu);
    if (in->valid & FATTR_MODE)
        p->mode = in->mode & 07777;
    if (in->valid & FATTR_UID)
        p->uid = in->uid;
    if (in->valid & FATTR_GID)
        p->gid = in->gid;
    if (in->valid & FATTR_MTIME_NOW)
        clock_gettime(CLOCK_REALTIME, &p->mtime);
    else if (in->valid & FATTR_MTIME) {
        p->mtime.tv_sec = (time_t)in->mtime;
        p->mtime.tv_nsec = in->mtimensec;
    }
    clock_gettime(CLOCK_REALTIME, &p->ctime_);
    pthread_mutex_unlock(&p->mu);
    reply_attr(w, unique);
}

static void do_statfs(struct worker *w, uint64_t unique)
{
    klc_plane *p = w->p;
    struct fuse_statfs_out out;
    memset(&out, 0, sizeof out);
    out.st.bsize = out.st.frsize = p->cfg.sector_size;
    out.st.blocks = p->cfg.size / p->cfg.sector_size;
    out.st.files = 1;
    out.st.namelen = 255;
    reply(w, unique, 0, &out, sizeof out, NULL, 0);
}

static void do_fallocate(struct worker *w, uint64_t unique, const struct fuse_fallocate_in *in)
{
    klc_plane *p = w->p;
    if (p->cfg.read_only) {
        reply_err(w, unique, EROFS);
        return;
    }
    if (in->mode & ~(uint32_t)FALLOC_FL_KEEP_SIZE) {
        reply_err(w, unique, EOPNOTSUPP);   /* no hole punching/zeroing (like dm-crypt without discards) */
        return;
    }
    if (in->offset > p->cfg.size || in->length > p->cfg.size - in->offset) {
        reply_err(w, unique, ENOSPC);
        return;
    }
    reply_err(w, unique, 0);                /* every byte is already allocated */
}

/* One request; buf holds n bytes. */
static void dispatch(struct worker *w, uint8_t *buf, size_t n)
{
    klc_plane *p = w->p;
    struct fuse_in_header *h = (struct fuse_in_header *)buf;
    if (n < sizeof *h || h->len != n)
        return;   /* malformed: cannot even answer reliably */
    const uint8_t *arg = buf + sizeof *h;
    size_t alen = n - sizeof *h;
    uint64_t u = h->unique;
    ADD(requests, 1);

#define NEED(T) do { if (alen < sizeof(T)) { reply_err(w, u, EINVAL); return; } } while (0)
    switch (h->opcode) {
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:      /* our requests are short; the original gets its normal answer */
    case FUSE_NOTIFY_REPLY:   /* answer to a retrieve we never send */
        return;
    case FUSE_READ:
        NEED(struct fuse_read_in);
        do_read(w, u, (const struct fuse_read_in *)arg);
        return;
    case FUSE_WRITE:
        NEED(struct fuse_write_in);
        do_write(w, u, (const struct fuse_write_in *)arg, arg + sizeof(struct fuse_write_in),
                 alen - sizeof(struct fuse_write_in));
        return;
    case FUSE_GETATTR:
        reply_attr(w, u);
        return;
    case FUSE_SETATTR:
        NEED(struct fuse_setattr_in);
        do_setattr(w, u, (const struct fuse_setattr_in *)arg);
        return;
    case FUSE_OPEN: {
        NEED(struct fuse_open_in);
        const struct fuse_open_in *oi = (const struct fuse_open_in *)arg;
        if (p->cfg.read_only && (oi->flags & O_ACCMODE) != O_RDONLY) {
            reply_err(w, u, EROFS);
            return;
        }
        struct fuse_open_out out = {0};
        /* KEEP_CACHE: nobody else changes the data, the page cache stays valid.
         * PARALLEL_DIRECT_WRITES: O_DIRECT writers do not serialise on the inode. */
        out.open_flags = FOPEN_KEEP_CACHE | FOPEN_PARALLEL_DIRECT_WRITES |
                         (p->cfg.direct_io ? FOPEN_DIRECT_IO : 0);
        reply(w, u, 0, &out, sizeof out, NULL, 0);
        return;
    }
    case FUSE_RELEASE:
    case FUSE_DESTROY:
        reply_err(w, u, 0);
        return;
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_SYNCFS:
        do_sync(w, u);
        return;
    case FUSE_STATFS:
        do_statfs(w, u);
        return;
    case FUSE_FALLOCATE:
        NEED(struct fuse_fallocate_in);
        do_fallocate(w, u, (const struct fuse_fallocate_in *)arg);
        return;
    case FUSE_LOOKUP:          /* the root is a regular file: nothing below it */
    case FUSE_OPENDIR:
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
    case FUSE_MKNOD:
    case FUSE_MKDIR:
    case FUSE_CREATE:
    case FUSE_TMPFILE:
    case FUSE_SYMLINK:
    case FUSE_LINK:
    case FUSE_UNLINK:
    case FUSE_RMDIR:
    case FUSE_RENAME:
    case FUSE_RENAME2:
        reply_err(w, u, ENOTDIR);
        return;
    case FUSE_INIT:            /* only once, answered by klc_plane_init */
        reply_err(w, u, EPROTO);
        return;
    default:                   /* xattrs, locks, access, bmap, ioctl, poll, lseek, ... */
        reply_err(w, u, ENOSYS);
        return;
    }
#undef NEED
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    klc_plane *p = w->p;
    char tname[16];
    snprintf(tname, sizeof tname, "klc-plane-%d", (int)(w - p->w));
    pthread_setname_np(pthread_self(), tname);
    for (;;) {
        ssize_t n = read(w->fd, w->req, w->req_len);
        if (n < 0) {
            if (errno == ENOENT || errno == EINTR || errno == EAGAIN)
                continue;        /* aborted request / signal: read the next one */
            break;               /* ENODEV: unmounted; anything else: give up */
        }
        dispatch(w, w->req, (size_t)n);
    }
    pthread_mutex_lock(&p->mu);
    p->running--;
    pthread_cond_broadcast(&p->ended);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- lifecycle --------------------------------------------------------- */

int klc_plane_new(const struct klc_plane_config *cfg, klc_xts *ctx, klc_plane **out)
{
    if (!cfg || !ctx || !out)
        return -EINVAL;
    uint32_t ss = cfg->sector_size;
    if (ss < 512 || ss > 4096 || (ss & (ss - 1)) || cfg->size % ss || cfg->size == 0 ||
        cfg->nthreads < 1 || cfg->nthreads > KLC_PLANE_MAX_THREADS ||
        cfg->max_write < 4096 || cfg->max_write > KLC_PLANE_MAX_WRITE ||
        cfg->fuse_fd < 0 || cfg->backing_fd < 0)
        return -EINVAL;
    klc_plane *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->cfg = *cfg;
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

int klc_plane_init(klc_plane *p, int timeout_ms)
{
    if (!p || p->initialized)
        return -EINVAL;
    size_t blen = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in) +
                  KLC_PLANE_MAX_WRITE + 4096;
    uint8_t *buf = malloc(blen);
    if (!buf)
        return -ENOMEM;
    int rc;
    for (;;) {
        struct pollfd pfd = {.fd = p->cfg.fuse_fd, .events = POLLIN};
        int pr = poll(&pfd, 1, timeout_ms);
        if (pr == 0) {
            rc = -ETIMEDOUT;
            goto out;
        }
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out;
        }
        ssize_t n = read(p->cfg.fuse_fd, buf, blen);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            rc = -errno;
            goto out;
        }
        struct fuse_in_header *h = (struct fuse_in_header *)buf;
        if ((size_t)n < sizeof *h + sizeof(struct fuse_init_in) || h->opcode != FUSE_INIT) {
            rc = -EPROTO;
            goto out;
        }
        const struct fuse_init_in *in = (const struct fuse_init_in *)(buf + sizeof *h);
        struct fuse_init_out o;
        memset(&o, 0, sizeof o);
        o.major = FUSE_KERNEL_VERSION;
        o.minor = FUSE_KERNEL_MINOR_VERSION;
        if (in->major < 7 || (in->major == 7 && in->minor < 28)) {
            /* too old for max_pages; refuse rather than run with tiny requests */
            struct fuse_out_header oh = {sizeof oh, -EPROTO, h->unique};
            (void)!write(p->cfg.fuse_fd, &oh, sizeof oh);
            rc = -EPROTO;
            goto out;
        }
        if (in->major > 7) {
            /* the kernel will ask again with major 7 */
            struct fuse_out_header oh = {sizeof oh + sizeof o, 0, h->unique};
            struct iovec iov[2] = {{&oh, sizeof oh}, {&o, sizeof o}};
            (void)!writev(p->cfg.fuse_fd, iov, 2);
            continue;
        }
        if (in->minor < o.minor)
            o.minor = in->minor;
        uint32_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO;
        /* Deliberately not: FUSE_WRITEBACK_CACHE (the daemon and kernel keep no dirty
         * data), FUSE_AUTO_INVAL_DATA (would GETATTR before reads), ATOMIC_O_TRUNC. */
        o.flags = in->flags & want;
        /* With FOPEN_DIRECT_IO, still allow shared mmap of the file (7.39's
         * FUSE_DIRECT_IO_ALLOW_MMAP, bit 36 = flags2 bit 4; older headers lack it). */
        if (p->cfg.direct_io && (in->flags & FUSE_INIT_EXT) && (in->flags2 & (1u << 4))) {
            o.flags |= FUSE_INIT_EXT;
            o.flags2 = 1u << 4;
        }
        o.max_readahead = in->max_readahead < p->cfg.max_write ? in->max_readahead
                                                               : p->cfg.max_write;
        o.max_write = p->cfg.max_write;
        o.max_pages = (uint16_t)((p->cfg.max_write + 4095) / 4096);
        uint32_t bg = p->cfg.max_background ? p->cfg.max_background : 64;
        if (bg > 65535)
            bg = 65535;
        o.max_background = (uint16_t)bg;
        o.congestion_threshold = (uint16_t)(bg * 3 / 4);
        o.time_gran = 1;
        struct fuse_out_header oh = {sizeof oh + sizeof o, 0, h->unique};
        struct iovec iov[2] = {{&oh, sizeof oh}, {&o, sizeof o}};
        if (writev(p->cfg.fuse_fd, iov, 2) < 0) {
            rc = -errno;
            goto out;
        }
        p->max_write = o.max_write;
        p->proto_minor = o.minor;
        p->initialized = 1;
        rc = 0;
        goto out;
    }
out:
    free(buf);
    return rc;
}

static void free_worker_bufs(struct worker *w)
{
    if (w->req)
        munmap(w->req, w->req_len);
    if (w->data)
        munmap(w->data, w->data_len);
    if (w->own_fd && w->fd >= 0)
        close(w->fd);
    w->req = w->data = NULL;
    w->fd = -1;
}

static void *map_buf(size_t len)
{
    void *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED)
        return NULL;
    /* Plaintext passes through these buffers: keep it out of core dumps. */
    madvise(b, len, MADV_DONTDUMP);
    return b;
}

int klc_plane_start(klc_plane *p)
{
    if (!p || !p->initialized || p->w)
        return -EINVAL;
    int n = p->cfg.nthreads;
    p->w = calloc((size_t)n, sizeof *p->w);
    if (!p->w)
        return -ENOMEM;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        struct worker *w = &p->w[i];
        w->p = p;
        w->fd = -1;
        w->req_len = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in) +
                     p->max_write + 4096;
        w->req_len = (w->req_len + 4095) & ~(size_t)4095;
        w->data_len = p->max_write + 2 * (size_t)p->cfg.sector_size;
        w->req = map_buf(w->req_len);
        w->data = map_buf(w->data_len);
        if (!w->req || !w->data) {
            rc = -ENOMEM;
            break;
        }
        if (i == 0) {
            w->fd = p->cfg.fuse_fd;
        } else {
            int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
            if (fd < 0) {
                rc = -errno;
                break;
            }
            uint32_t src = (uint32_t)p->cfg.fuse_fd;
            if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) != 0) {
                rc = -errno;
                close(fd);
                break;
            }
            w->fd = fd;
            w->own_fd = 1;
        }
    }
    if (rc == 0) {
        /* Workers run with every signal blocked: signals go to Python's thread. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (int i = 0; i < n; i++) {
            pthread_mutex_lock(&p->mu);
            p->running++;
            pthread_mutex_unlock(&p->mu);
            int e = pthread_create(&p->w[i].tid, NULL, worker_main, &p->w[i]);
            if (e) {
                pthread_mutex_lock(&p->mu);
                p->running--;
                pthread_mutex_unlock(&p->mu);
                rc = -e;
                /* threads already started keep serving; they end at unmount */
                n = i;
                break;
            }
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        p->nworkers = n;
        if (rc == 0)
            return 0;
        if (n > 0)
            return rc;   /* caller unmounts, then klc_plane_wait joins the started ones */
    }
    for (int i = 0; i < p->cfg.nthreads; i++)
        free_worker_bufs(&p->w[i]);
    free(p->w);
    p->w = NULL;
    p->nworkers = 0;
    return rc;
}

int klc_plane_wait(klc_plane *p, int timeout_ms)
{
    if (!p)
        return 1;
    struct timespec dl;
    deadline_after(&dl, timeout_ms < 0 ? 0 : (uint32_t)timeout_ms);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0) {
        if (pthread_cond_timedwait(&p->ended, &p->mu, &dl) == ETIMEDOUT && p->running > 0) {
            pthread_mutex_unlock(&p->mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&p->mu);
    if (p->w) {
        for (int i = 0; i < p->nworkers; i++)
            pthread_join(p->w[i].tid, NULL);
        for (int i = 0; i < p->cfg.nthreads; i++)
            free_worker_bufs(&p->w[i]);
        free(p->w);
        p->w = NULL;
        p->nworkers = 0;
    }
    return 1;
}

void klc_plane_stats(klc_plane *p, struct klc_plane_stats *out)
{
    if (!p || !out)
        return;
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

void klc_plane_free(klc_plane *p)
{
    if (!p)
        return;
    if (p->w)
        klc_plane_wait(p, 0);
    if (p->w)
        return;     /* threads still running: leak rather than free under them */
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->rmu);
    pthread_cond_destroy(&p->unlocked);
    pthread_cond_destroy(&p->drained);
    pthread_cond_destroy(&p->rcv);
    pthread_cond_destroy(&p->ended);
    free(p);
}

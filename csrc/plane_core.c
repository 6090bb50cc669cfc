/* plane_core.c — the I/O core: the answer to every FUSE request of the
 * one-file filesystem, whatever transport brought it (see transport.h).
 *
 * One request = at most one backing pread (reads, or the partial head/tail
 * sectors of a write) + one engine call over all its sectors + one backing
 * pwrite.  No caching here: the kernel's page cache is the only cache
 * (write-through: no FUSE_WRITEBACK_CACHE), FSYNC/SYNCFS reach the backing
 * store as fdatasync, and the first backing write/sync error is latched for
 * every later FSYNC/FLUSH/SYNCFS (see do_sync).
 *
 * Offset maths: span_of() is the only place a file offset becomes sectors,
 * a backing offset or an XTS tweak; everything else works on its result.
 *
 * Contract of every answer: each request gets exactly one reply, except
 * FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY, which the kernel expects
 * no answer to; unknown opcodes get ENOSYS; an argument struct shorter than
 * the opcode needs gets EINVAL; a WRITE whose size is not its payload's
 * length gets EINVAL.  READ past the end: a short (possibly empty) read;
 * WRITE starting past the end: ENOSPC, reaching past it: a short write
 * (both as a block device).  Backing errors pass through as their errno
 * (EIO, ENOSPC, ...).
 *
 * Security contract: if the engine fails (KLC_ERR_KEYLOCKER from a dead Key
 * Locker handle, ...) the buffer it produced is never written to the backing
 * store nor returned to the reader: the request gets EIO (or, with
 * lock_on_key_failure, waits for a new context and is redone from the
 * ciphertext/plaintext it started from).  Plaintext passes only through
 * buffers excluded from core dumps (MADV_DONTDUMP) or the transport's own.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "plane_internal.h"

struct klc_io {
    klc_plane *p;
    uint8_t *data;             /* sector buffer: max_write + 2 sectors, page aligned */
    size_t data_len;
    union {                    /* small reply arguments live here until sent */
        struct fuse_attr_out attr;
        struct fuse_open_out open;
        struct fuse_write_out write;
        struct fuse_statfs_out statfs;
    } small;
};

/* ---- sectors: the one place offset maths happens ------------------------ */

/* The whole sectors that cover file bytes [off, off + len), len > 0 and
 * off + len <= size (callers clamp first). */
struct span {
    uint64_t s0;               /* first sector */
    size_t nbytes;             /* bytes of whole sectors */
    size_t head;               /* bytes of sector s0 before off */
    size_t end;                /* off + len relative to sector s0's start */
    uint64_t dev_off;          /* backing offset of sector s0 */
    uint64_t tweak;            /* plain64 tweak of sector s0 */
};

static struct span span_of(const klc_plane *p, uint64_t off, uint64_t len)
{
    const uint64_t ss = p->cfg.sector_size;
    struct span s;
    s.s0 = off / ss;
    uint64_t s1 = (off + len - 1) / ss;
    s.nbytes = (size_t)((s1 - s.s0 + 1) * ss);
    s.head = (size_t)(off - s.s0 * ss);
    s.end = (size_t)(off + len - s.s0 * ss);
    s.dev_off = p->cfg.data_offset + s.s0 * ss;
    s.tweak = p->cfg.iv_tweak + s.s0 * (ss / 512);     /* plain64 counts 512-byte units */
    return s;
}

/* Tweak of the sector at byte boff (a multiple of the sector size) of a span. */
static uint64_t span_tweak(const klc_plane *p, const struct span *s, size_t boff)
{
    return s->tweak + boff / p->cfg.sector_size * (p->cfg.sector_size / 512);
}

/* ---- backing I/O ---------------------------------------------------------- */

/* All of len bytes at off, or -errno (-EIO: the backing store ended early). */
static int backing_rw(int fd, int write, uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = write ? pwrite(fd, buf + done, len - done, (off_t)(off + done))
                          : pread(fd, buf + done, len - done, (off_t)(off + done));
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

static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
    return backing_rw(fd, 0, buf, len, off);
}

static int pwrite_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
    return backing_rw(fd, 1, buf, len, off);
}

/* Write-error latching.  The backing descriptor is one shared file: the
 * kernel's errseq reports a writeback error of the backing file to the first
 * fsync after it and then forgets it, so whichever sync came first (a FLUSH
 * from an unrelated close, say) would consume the error and the sync that
 * matters (ext4's journal commit through the loop device) would succeed over
 * lost data.  So the plane keeps the first backing write or sync error itself
 * and returns it to every later FSYNC/FLUSH/SYNCFS until it is freed (the
 * mapping closed): sticky, as a disk that lost a write stays suspect.  WRITE
 * replies still carry their own error; reads are not affected. */
static void wb_error(klc_plane *p, int err)
{
    int none = 0;
    ADD(wb_errors, 1);
    __atomic_compare_exchange_n(&p->wb_err, &none, err, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---- replies -------------------------------------------------------------- */

static int answer(const struct klc_req *rq, struct klc_reply *rep, int err,
                  const void *arg, size_t len)
{
    rep->unique = rq->in->unique;
    rep->error = err ? -err : 0;
    rep->arg = arg;
    rep->arg_len = (uint32_t)len;
    if (rq->out && len) {
        /* the transport's reply buffer (io_uring payload): the bytes must be there */
        if (arg != rq->out)
            memmove(rq->out, arg, len);
        rep->arg = rq->out;
    }
    return KLC_REPLY;
}

static int answer_err(const struct klc_req *rq, struct klc_reply *rep, int err)
{
    return answer(rq, rep, err, NULL, 0);
}

static void fill_attr(klc_plane *p, struct fuse_attr *a)
{
    memset(a, 0, sizeof *a);
    a->ino = FUSE_ROOT_ID;
    a->size = klc_size(p);
    a->blocks = a->size / 512;
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

static int answer_attr(struct klc_io *io, const struct klc_req *rq, struct klc_reply *rep)
{
    struct fuse_attr_out *out = &io->small.attr;
    memset(out, 0, sizeof *out);
    /* The size never changes behind the kernel's back: let it cache the
     * attributes, so reads need no GETATTR. */
    out->attr_valid = 3600;
    fill_attr(io->p, &out->attr);
    return answer(rq, rep, 0, out, sizeof *out);
}

/* ---- READ / WRITE ------------------------------------------------------------ */

static int do_read(struct klc_io *io, const struct klc_req *rq, const struct fuse_read_in *in,
                   struct klc_reply *rep)
{
    klc_plane *p = io->p;
    uint64_t off = in->offset, len = in->size, size = klc_size(p);
    if (off >= size || len == 0)
        return answer(rq, rep, 0, NULL, 0);          /* EOF: short (empty) read */
    if (len > size - off)
        len = size - off;                            /* short read at the end */
    if (rq->out && len > rq->out_cap)
        return answer_err(rq, rep, EINVAL);
    struct span s = span_of(p, off, len);
    /* Sector-aligned reads decrypt straight into the transport's reply buffer. */
    uint8_t *buf = io->data;
    if (rq->out && s.head == 0 && s.nbytes <= rq->out_cap)
        buf = rq->out;
    else if (s.nbytes > io->data_len)
        return answer_err(rq, rep, EINVAL);
    int rc = pread_full(p->bfd, buf, s.nbytes, s.dev_off);
    for (;;) {
        if (rc < 0) {
            ADD(read_errors, 1);
            return answer_err(rq, rep, -rc);
        }
        klc_xts *c = klc_ctx_get(p);
        if (!c)
            return answer_err(rq, rep, EIO);
        rc = klc_xts_crypt(c, 0, buf, buf, s.nbytes, p->cfg.sector_size, s.tweak,
                           p->cfg.engine_threads);
        klc_ctx_put(p);
        if (rc == KLC_OK)
            break;
        if (!klc_ctx_failed(p, c, rc))
            return answer_err(rq, rep, EIO);   /* never return what a failed engine produced */
        /* the buffer may be garbage now: read the ciphertext again */
        rc = pread_full(p->bfd, buf, s.nbytes, s.dev_off);
    }
    ADD(reads, 1);
    ADD(read_bytes, len);
    return answer(rq, rep, 0, buf + s.head, (size_t)len);
}

/* Encrypt file bytes [off, off + len) from src and write them.  0 or a positive errno. */
static int write_sectors(struct klc_io *io, uint64_t off, uint64_t len, const uint8_t *src)
{
    klc_plane *p = io->p;
    const uint32_t ss = p->cfg.sector_size;
    struct span s = span_of(p, off, len);
    int partial_head = s.head != 0;
    int partial_tail = s.end != s.nbytes;
    int one = s.nbytes == ss;                  /* head and tail are the same sector */
    size_t last = s.nbytes - ss;               /* buffer offset of the last sector */
    uint8_t *buf = io->data;
    int rc;

    if (s.nbytes > io->data_len)
        return EINVAL;
    struct range r = {.first = s.s0, .last = s.s0 + s.nbytes / ss - 1};
    klc_range_lock(p, &r);
    for (;;) {
        klc_xts *c = klc_ctx_get(p);
        if (!c) {
            rc = -EIO;
            break;
        }
        if (partial_head || partial_tail) {
            /* Read-modify-write of the partial first/last sector, under the range lock. */
            ADD(rmw, 1);
            rc = 0;
            if (partial_head)
                rc = pread_full(p->bfd, buf, ss, s.dev_off);
            if (rc == 0 && partial_tail && !(partial_head && one))
                rc = pread_full(p->bfd, buf + last, ss, s.dev_off + last);
            if (rc < 0) {
                klc_ctx_put(p);
                ADD(read_errors, 1);
                break;
            }
            if (partial_head)
                rc = klc_xts_crypt(c, 0, buf, buf, ss, ss, s.tweak, 1);
            if (rc == KLC_OK && partial_tail && !(partial_head && one))
                rc = klc_xts_crypt(c, 0, buf + last, buf + last, ss, ss,
                                   span_tweak(p, &s, last), 1);
            if (rc == KLC_OK) {
                /* Merge only the partial sectors; the whole sectors between them are
                 * encrypted straight from the request (no copy of the payload).  A
                 * 1 MiB write from a buffer that is not page aligned arrives as two
                 * requests with a partial sector each, so this path is common. */
                if (one) {
                    memcpy(buf + s.head, src, (size_t)len);
                    rc = klc_xts_crypt(c, 1, buf, buf, ss, ss, s.tweak, 1);
                } else {
                    size_t mid0 = partial_head ? ss : 0;               /* buffer offsets */
                    size_t mid1 = partial_tail ? last : s.nbytes;
                    if (partial_head)
                        memcpy(buf + s.head, src, ss - s.head);
                    if (partial_tail)
                        memcpy(buf + mid1, src + (mid1 - s.head), s.end - mid1);
                    if (partial_head)
                        rc = klc_xts_crypt(c, 1, buf, buf, ss, ss, s.tweak, 1);
                    if (rc == KLC_OK && mid1 > mid0)
                        rc = klc_xts_crypt(c, 1, buf + mid0, src + (mid0 - s.head), mid1 - mid0,
                                           ss, span_tweak(p, &s, mid0), p->cfg.engine_threads);
                    if (rc == KLC_OK && partial_tail)
                        rc = klc_xts_crypt(c, 1, buf + mid1, buf + mid1, ss, ss,
                                           span_tweak(p, &s, mid1), 1);
                }
            }
        } else {
            /* Whole sectors: encrypt straight from the request into the buffer. */
            rc = klc_xts_crypt(c, 1, buf, src, s.nbytes, ss, s.tweak, p->cfg.engine_threads);
        }
        klc_ctx_put(p);
        if (rc == KLC_OK) {
            rc = pwrite_full(p->bfd, buf, s.nbytes, s.dev_off);
            if (rc < 0) {
                ADD(write_errors, 1);
                wb_error(p, -rc);
            }
            break;
        }
        if (!klc_ctx_failed(p, c, rc)) {
            rc = -EIO;           /* nothing the failed engine produced is written */
            break;
        }
    }
    klc_range_unlock(p, &r);
    return rc < 0 ? -rc : 0;
}

static int do_write(struct klc_io *io, const struct klc_req *rq, const struct fuse_write_in *in,
                    struct klc_reply *rep)
{
    klc_plane *p = io->p;
    uint64_t off = in->offset, len = in->size, size = klc_size(p);
    if (len != rq->payload_len)
        return answer_err(rq, rep, EINVAL);
    if (p->cfg.read_only)
        return answer_err(rq, rep, EROFS);
    struct fuse_write_out *out = &io->small.write;
    memset(out, 0, sizeof *out);
    if (len == 0)
        return answer(rq, rep, 0, out, sizeof *out);
    if (off >= size)
        return answer_err(rq, rep, ENOSPC);    /* like a block device: no room past the end */
    if (len > size - off)
        len = size - off;                      /* short write up to the end */
    int err = write_sectors(io, off, len, rq->payload);
    if (err)
        return answer_err(rq, rep, err);
    ADD(writes, 1);
    ADD(written_bytes, len);
    out->size = (uint32_t)len;
    return answer(rq, rep, 0, out, sizeof *out);
}

/* ---- the other opcodes --------------------------------------------------------- */

/* FSYNC and SYNCFS: fdatasync of the backing store, then the latched error.
 * FLUSH (sent at every close(2) of a descriptor of the file) does not sync:
 * close promises no durability (POSIX; nor does closing a block device or a
 * dm-crypt device), the loop device and ext4 ask for it with REQ_PREFLUSH,
 * which reaches us as FSYNC, and every WRITE was already answered (no
 * writeback cache) so there is nothing of ours to push.  A per-close
 * fdatasync cost a cache flush of the backing disk for every blkid/udev probe
 * and, worse, consumed errseq errors before the FSYNC that needed them.  FLUSH
 * still returns the latched error, so close(2) reports a lost write. */
int klc_plane_sync(klc_plane *p)
{
    if (!p)
        return -EINVAL;
    if (p->cfg.read_only)
        return 0;                             /* nothing was ever written */
    if (fdatasync(p->bfd) != 0) {
        ADD(sync_errors, 1);
        wb_error(p, errno);
    } else {
        ADD(syncs, 1);
    }
    return -__atomic_load_n(&p->wb_err, __ATOMIC_SEQ_CST);
}

static int do_sync(struct klc_io *io, const struct klc_req *rq, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    if (p->cfg.read_only)
        return answer_err(rq, rep, 0);
    if (rq->in->opcode == FUSE_FLUSH)
        return answer_err(rq, rep, __atomic_load_n(&p->wb_err, __ATOMIC_SEQ_CST));
    return answer_err(rq, rep, -klc_plane_sync(p));
}

static int do_setattr(struct klc_io *io, const struct klc_req *rq,
                      const struct fuse_setattr_in *in, struct klc_reply *rep)
{
    klc_plane *p = io->p;
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
        p->mtime.tv_nsec = in->mtimensec < 1000000000u ? in->mtimensec : 0;
    }
    clock_gettime(CLOCK_REALTIME, &p->ctime_);
    pthread_mutex_unlock(&p->mu);
    return answer_attr(io, rq, rep);
}

static int do_statfs(struct klc_io *io, const struct klc_req *rq, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    struct fuse_statfs_out *out = &io->small.statfs;
    memset(out, 0, sizeof *out);
    out->st.bsize = out->st.frsize = p->cfg.sector_size;
    out->st.blocks = klc_size(p) / p->cfg.sector_size;
    out->st.files = 1;
    out->st.namelen = 255;
    return answer(rq, rep, 0, out, sizeof *out);
}

/* Discard (FALLOCATE with PUNCH_HOLE|KEEP_SIZE, what the loop device sends for
 * a discard) of whole sectors: a hole punched in a backing file, BLKDISCARD
 * on a backing block device.  A discarded sector then reads back as the
 * decryption of whatever the backing returns (zeros from a hole, so: the
 * decryption of zeros, as with dm-crypt), not as zeros: fallocate(2)'s
 * "reads return zeros" cannot hold for ciphertext.  For the same reason a
 * range that is not whole sectors is refused (EOPNOTSUPP; the kernel does
 * not disable fallocate for that answer, only for ENOSYS) rather than
 * zero-filled: no part of the range would read back as zeros anyway, and the
 * loop device never sends one (its logical block size is the sector size).
 * Off unless allow_discards: discards show the backing store which sectors
 * are unused (cryptsetup's --allow-discards warning). */
static int do_discard(struct klc_io *io, const struct klc_req *rq,
                      const struct fuse_fallocate_in *in, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    const uint64_t ss = p->cfg.sector_size, size = klc_size(p);
    if (!__atomic_load_n(&p->allow_discards, __ATOMIC_ACQUIRE))
        return answer_err(rq, rep, EOPNOTSUPP);
    if (in->offset >= size || in->length == 0)
        return answer_err(rq, rep, 0);             /* nothing of the volume in the range */
    uint64_t end = in->length > size - in->offset ? size : in->offset + in->length;
    if (in->offset % ss || end % ss)
        return answer_err(rq, rep, EOPNOTSUPP);
    struct span s = span_of(p, in->offset, end - in->offset);
    struct range r = {.first = s.s0, .last = s.s0 + s.nbytes / ss - 1};
    klc_range_lock(p, &r);                         /* not under a write of the same sectors */
    int rc;
    if (p->backing_blk) {
        uint64_t range[2] = {s.dev_off, s.nbytes};
        rc = ioctl(p->bfd, BLKDISCARD, range);
    } else {
        rc = fallocate(p->bfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       (off_t)s.dev_off, (off_t)s.nbytes);
    }
    int err = rc != 0 ? errno : 0;
    klc_range_unlock(p, &r);
    if (err) {
        ADD(discard_errors, 1);
        return answer_err(rq, rep, err);
    }
    ADD(discards, 1);
    ADD(discard_bytes, s.nbytes);
    return answer_err(rq, rep, 0);
}

static int do_fallocate(struct klc_io *io, const struct klc_req *rq,
                        const struct fuse_fallocate_in *in, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    uint64_t size = klc_size(p);
    if (p->cfg.read_only)
        return answer_err(rq, rep, EROFS);
    if (in->mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        return do_discard(io, rq, in, rep);
    if (in->mode & ~(uint32_t)FALLOC_FL_KEEP_SIZE)
        return answer_err(rq, rep, EOPNOTSUPP);  /* no zeroing, collapsing, inserting */
    if (in->offset > size || in->length > size - in->offset)
        return answer_err(rq, rep, ENOSPC);
    return answer_err(rq, rep, 0);               /* every byte is already allocated */
}

static int do_open(struct klc_io *io, const struct klc_req *rq, const struct fuse_open_in *oi,
                   struct klc_reply *rep)
{
    klc_plane *p = io->p;
    if (p->cfg.read_only && (oi->flags & O_ACCMODE) != O_RDONLY)
        return answer_err(rq, rep, EROFS);
    struct fuse_open_out *out = &io->small.open;
    memset(out, 0, sizeof *out);
    /* KEEP_CACHE: nobody else changes the data, the page cache stays valid.
     * PARALLEL_DIRECT_WRITES: O_DIRECT writers do not serialise on the inode. */
    out->open_flags = FOPEN_KEEP_CACHE | FOPEN_PARALLEL_DIRECT_WRITES |
                      (p->cfg.direct_io ? FOPEN_DIRECT_IO : 0);
    return answer(rq, rep, 0, out, sizeof *out);
}

/* ---- dispatch ------------------------------------------------------------------- */

int klc_io_dispatch(struct klc_io *io, const struct klc_req *rq, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    const struct fuse_in_header *h = rq->in;
    ADD(requests, 1);

#define NEED(T) do { if (rq->op_len < sizeof(T)) return answer_err(rq, rep, EINVAL); } while (0)
    switch (h->opcode) {
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:      /* our requests are short; the original gets its normal answer */
    case FUSE_NOTIFY_REPLY:   /* answer to a retrieve we never send */
        return KLC_NO_REPLY;
    case FUSE_READ:
        NEED(struct fuse_read_in);
        return do_read(io, rq, rq->op, rep);
    case FUSE_WRITE:
        NEED(struct fuse_write_in);
        return do_write(io, rq, rq->op, rep);
    case FUSE_GETATTR:
        return answer_attr(io, rq, rep);
    case FUSE_SETATTR:
        NEED(struct fuse_setattr_in);
        return do_setattr(io, rq, rq->op, rep);
    case FUSE_OPEN:
        NEED(struct fuse_open_in);
        return do_open(io, rq, rq->op, rep);
    case FUSE_RELEASE:
    case FUSE_DESTROY:
        return answer_err(rq, rep, 0);
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_SYNCFS:
        return do_sync(io, rq, rep);
    case FUSE_STATFS:
        return do_statfs(io, rq, rep);
    case FUSE_FALLOCATE:
        NEED(struct fuse_fallocate_in);
        return do_fallocate(io, rq, rq->op, rep);
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
        return answer_err(rq, rep, ENOTDIR);
    case FUSE_INIT:            /* only once, answered by klc_plane_init */
        return answer_err(rq, rep, EPROTO);
    default:                   /* xattrs, locks, access, bmap, ioctl, poll, lseek, ... */
        return answer_err(rq, rep, ENOSYS);
    }
#undef NEED
}

int klc_io_dispatch_wire(struct klc_io *io, const uint8_t *buf, size_t n, struct klc_reply *rep)
{
    klc_plane *p = io->p;
    if (n < sizeof(struct fuse_in_header)) {
        ADD(malformed, 1);
        return KLC_NO_REPLY;          /* no unique to answer to */
    }
    struct klc_req rq = {.in = (const struct fuse_in_header *)buf};
    if (rq.in->len != n) {
        ADD(malformed, 1);
        return answer_err(&rq, rep, EINVAL);
    }
    rq.op = buf + sizeof *rq.in;
    rq.op_len = (uint32_t)(n - sizeof *rq.in);
    if (rq.in->opcode == FUSE_WRITE && rq.op_len >= sizeof(struct fuse_write_in)) {
        rq.payload = (const uint8_t *)rq.op + sizeof(struct fuse_write_in);
        rq.payload_len = rq.op_len - (uint32_t)sizeof(struct fuse_write_in);
        rq.op_len = sizeof(struct fuse_write_in);
    }
    return klc_io_dispatch(io, &rq, rep);
}

/* ---- per-thread state ------------------------------------------------------------- */

struct klc_io *klc_io_new(klc_plane *p)
{
    struct klc_io *io = calloc(1, sizeof *io);
    if (!io)
        return NULL;
    io->p = p;
    uint32_t mw = p->max_write ? p->max_write : p->cfg.max_write;
    io->data_len = ((size_t)mw + 2 * (size_t)p->cfg.sector_size + 4095) & ~(size_t)4095;
    void *b = mmap(NULL, io->data_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (b == MAP_FAILED) {
        free(io);
        return NULL;
    }
    /* Plaintext passes through this buffer: keep it out of core dumps. */
    madvise(b, io->data_len, MADV_DONTDUMP);
    io->data = b;
    return io;
}

void klc_io_free(struct klc_io *io)
{
    if (!io)
        return;
    if (io->data)
        munmap(io->data, io->data_len);
    free(io);
}

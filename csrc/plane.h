/* plane.h — the C data plane: a one-file FUSE filesystem served by C threads.
 *
 * The Python control plane mounts (klc_fuse_mount), builds an engine context
 * (klc_xts) and a plane over the backing store, lets the plane answer FUSE_INIT
 * (klc_plane_init), then starts the transport's threads (klc_plane_start).
 * With the /dev/fuse transport each thread reads requests from its own
 * descriptor (cloned from the session's with FUSE_DEV_IOC_CLONE) and answers
 * them itself: one backing pread/pwrite of whole sectors and one engine call
 * per READ/WRITE.  The threads end when the filesystem is unmounted (ENODEV).
 * The socket transport does the same on one end of a SOCK_SEQPACKET
 * socketpair standing in for /dev/fuse (tests without root; EOF ends it).
 * Inside: csrc/transport.h (the transport interface), plane_session.c,
 * plane_core.c, plane.c, plane_dev.c.
 *
 * Ownership: the plane borrows the klc_xts context and the two descriptors; the
 * caller frees/closes them after klc_plane_wait() returned 1 (or after
 * klc_plane_lock() handed the context back).
 *
 * cdef-safe (read by csrc/build_ffi.py): plain declarations, integer #defines.
 */
#ifndef KLC_PLANE_H
#define KLC_PLANE_H
#include <stddef.h>
#include <stdint.h>

typedef struct klc_plane klc_plane;

#define KLC_PLANE_MAX_WRITE    1048576   /* bytes per FUSE request (max_write, max_pages) */
#define KLC_PLANE_MAX_THREADS  64

/* klc_plane_config.backing_io */
#define KLC_BACKING_BUFFERED   0   /* pread/pwrite through the backing's page cache */
#define KLC_BACKING_DIRECT     1   /* O_DIRECT, or klc_plane_new fails (-errno) */
#define KLC_BACKING_AUTO       2   /* O_DIRECT where the backing takes it, else buffered */

/* klc_plane_config.transport */
#define KLC_TRANSPORT_DEV      0   /* /dev/fuse: read/writev, one cloned descriptor per thread */
#define KLC_TRANSPORT_SOCKET   1   /* fuse_fd is a SOCK_SEQPACKET socket (in-process tests) */
#define KLC_TRANSPORT_URING    2   /* FUSE over io_uring (if compiled in; else -EOPNOTSUPP) */
#define KLC_TRANSPORT_AUTO     3   /* io_uring if the kernel grants it at INIT, else /dev/fuse */

struct klc_plane_config {
    int fuse_fd;              /* the session's /dev/fuse descriptor (already mounted) */
    int backing_fd;           /* the encrypted device or image (O_RDWR, or O_RDONLY if read_only) */
    uint64_t data_offset;     /* bytes: start of the data segment on the backing store */
    uint64_t size;            /* bytes: size of the plaintext file (multiple of sector_size) */
    uint32_t sector_size;     /* bytes: 512..4096, power of two */
    uint64_t iv_tweak;        /* plain64 tweak of the segment's first 512-byte unit */
    int read_only;            /* refuse WRITE/FALLOCATE with EROFS, OPEN for writing too */
    int nthreads;             /* worker threads, 1..KLC_PLANE_MAX_THREADS */
    int direct_io;            /* FOPEN_DIRECT_IO: the kernel bypasses its page cache */
    uint32_t uid;             /* owner of the file */
    uint32_t gid;
    uint32_t mode;            /* permission bits of the file (e.g. 0600) */
    uint32_t max_write;       /* bytes per request, 4096..KLC_PLANE_MAX_WRITE */
    uint32_t max_background;  /* asynchronous requests the kernel may have in flight */
    int engine_threads;       /* max_threads for klc_xts_crypt (0 = library default) */
    uint32_t lock_timeout_ms; /* how long a request waits while the plane is locked */
    int lock_on_key_failure;  /* a KLC_ERR_KEYLOCKER from the engine locks the plane and
                                 the request waits for a new context instead of EIO */
    int transport;            /* KLC_TRANSPORT_*: how requests reach the plane */
    int allow_discards;       /* FALLOCATE(PUNCH_HOLE|KEEP_SIZE) of whole sectors punches a
                                 hole in a backing file / BLKDISCARDs a backing block device;
                                 0: EOPNOTSUPP (dm-crypt's default).  See klc_plane_set_discards. */
    int backing_io;           /* KLC_BACKING_*: O_DIRECT through the plane's own descriptor of
                                 the backing file (reopened via /proc/self/fd, same inode
                                 checked) once a probe read of one sector at data_offset
                                 shows the alignment is accepted */
};

struct klc_plane_stats {
    uint64_t reads;           /* READ requests answered with data */
    uint64_t writes;          /* WRITE requests that reached the backing store */
    uint64_t read_bytes;      /* plaintext bytes returned */
    uint64_t written_bytes;   /* plaintext bytes accepted */
    uint64_t rmw;             /* writes that read-modify-wrote a partial sector */
    uint64_t syncs;           /* FSYNC/SYNCFS whose fdatasync succeeded (FLUSH: none) */
    uint64_t read_errors;     /* backing pread failed or came up short */
    uint64_t write_errors;    /* backing pwrite failed (EIO, ENOSPC, ...) */
    uint64_t sync_errors;     /* fdatasync failed */
    uint64_t engine_errors;   /* the engine refused a call (e.g. KLC_ERR_KEYLOCKER) */
    uint64_t lock_timeouts;   /* requests that gave up waiting on a locked plane */
    uint64_t reply_errors;    /* writing a reply to /dev/fuse failed (not ENOENT) */
    uint64_t requests;        /* all requests read from /dev/fuse */
    uint64_t malformed;       /* messages too short for a header, or len != bytes read */
    uint64_t wb_errors;       /* backing write or sync errors (pwrite, fdatasync) */
    uint64_t discards;        /* discards (punch hole / BLKDISCARD) that reached the backing */
    uint64_t discard_bytes;   /* bytes discarded */
    uint64_t discard_errors;  /* discards the backing refused */
    uint64_t size;            /* bytes: the file size the plane reports now */
    int locked;               /* 1 while no context is installed */
    int key_failed;           /* 1 once an engine call failed with KLC_ERR_KEYLOCKER */
    int threads;              /* worker threads still running */
    uint32_t proto_minor;     /* negotiated FUSE protocol minor */
    uint32_t max_write;       /* negotiated bytes per request */
    char transport[16];       /* the running transport's name ("dev", "socket", "uring") */
    int wb_errno;             /* the first backing write/sync error (0: none); every
                                 FSYNC/FLUSH/SYNCFS returns it until the plane is freed */
    int allow_discards;       /* discards passed down now */
    int backing_direct;       /* 1 if backing I/O bypasses the backing's page cache (O_DIRECT) */
};

/* Open /dev/fuse and mount(2) it on target (a regular file or a directory):
 * type "fuse.klcrypt", source shown in /proc/mounts, options appended after
 * fd=,rootmode=,user_id=,group_id= (may be "" or e.g. "allow_other").  flags:
 * mount(2) MS_* flags.  Returns 0 and the descriptor in *fd_out, or -errno. */
int klc_fuse_mount(const char *source, const char *target, const char *options,
                   unsigned long flags, int *fd_out);

int klc_plane_new(const struct klc_plane_config *cfg, klc_xts *ctx, klc_plane **out);
/* Read FUSE_INIT from the session descriptor (waiting at most timeout_ms) and
 * answer it with the plane's choices.  0, or -errno (-ETIMEDOUT, -EPROTO). */
int klc_plane_init(klc_plane *p, int timeout_ms);
/* Start the transport's threads.  0 or -errno (then no thread is running,
 * except after a partial start: see klc_plane_start in plane.c).
 * -EOPNOTSUPP: the transport is not compiled in or the kernel did not grant
 * what it needs at INIT. */
int klc_plane_start(klc_plane *p);
/* Wait at most timeout_ms for every worker to end (after unmount).  1 when all
 * ended (and were joined), 0 on timeout. */
int klc_plane_wait(klc_plane *p, int timeout_ms);
void klc_plane_stats(klc_plane *p, struct klc_plane_stats *out);
/* Lock: new requests park (bounded by lock_timeout_ms, then EIO); waits until
 * no request uses the context, then hands it back in *old (the caller frees it;
 * NULL if it was already locked). */
int klc_plane_lock(klc_plane *p, klc_xts **old);
/* Install a new context and wake the parked requests. */
int klc_plane_unlock(klc_plane *p, klc_xts *ctx);
/* Online resize: from now on report new_size bytes (a multiple of the sector
 * size, > 0; the caller checked that the backing store holds it) and tell the
 * kernel with FUSE_NOTIFY_INVAL_INODE (attributes; on a shrink also the page
 * cache past the new end).  The kernel fetches the new size at its next
 * GETATTR: stat(2) the file before LOOP_SET_CAPACITY, which reads the cached
 * inode size.  Requests already past their size check finish with the old
 * size.  0, -EINVAL, or the notification's write error. */
int klc_plane_set_size(klc_plane *p, uint64_t new_size);
/* fdatasync the backing store as FSYNC does (an error is latched like one
 * met by FSYNC) and return the latched error: 0 or -errno.  The control
 * plane's own flushes (before sleep, ...) go through this, never a bare
 * fdatasync of the backing descriptor, which would consume the backing
 * file's errseq error before the plane sees it. */
int klc_plane_sync(klc_plane *p);
/* Switch discards on/off on a live plane (cryptsetup refresh --allow-discards). */
int klc_plane_set_discards(klc_plane *p, int on);
/* Free the plane; only after klc_plane_wait returned 1 or klc_plane_start failed
 * or was never called. */
void klc_plane_free(klc_plane *p);

#endif

/* plane_session.c — the FUSE session: mount(2) of /dev/fuse on the target,
 * and the FUSE_INIT negotiation answered on the session descriptor before any
 * transport starts.
 *
 * INIT contract: the kernel sends exactly one INIT right after the mount (a
 * second one only if we answered a major > 7 with our own major, which it
 * then re-sends as 7.x).  Kernels older than 7.28 (no max_pages) are refused
 * with EPROTO rather than run with 32 KiB requests.  The plane asks for
 * ASYNC_READ, BIG_WRITES, MAX_PAGES, ASYNC_DIO, plus whatever the transport
 * asks for (io_uring: FUSE_OVER_IO_URING), and grants only what the kernel
 * offered.  Deliberately not: WRITEBACK_CACHE (neither the kernel nor the
 * daemon may keep dirty plaintext the backing store has not seen),
 * AUTO_INVAL_DATA (it would GETATTR before reads), ATOMIC_O_TRUNC.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include "plane_internal.h"

/* flags2 bit 4 (7.39): FUSE_DIRECT_IO_ALLOW_MMAP; older headers lack the name. */
#define INIT_DIRECT_IO_ALLOW_MMAP (1ULL << 36)

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

static int send_init_reply(int fd, uint64_t unique, int err, const void *arg, size_t len)
{
    struct fuse_out_header oh = {(uint32_t)(sizeof oh + len), err, unique};
    struct iovec iov[2] = {{&oh, sizeof oh}, {(void *)arg, len}};
    ssize_t r;
    do
        r = writev(fd, iov, len ? 2 : 1);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int klc_plane_init(klc_plane *p, int timeout_ms)
{
    if (!p || p->initialized)
        return -EINVAL;
    /* big enough for any request the kernel may have queued, so a read never
     * fails with EINVAL for a short buffer */
    size_t blen = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in) +
                  KLC_PLANE_MAX_WRITE + 4096;
    uint8_t *buf = malloc(blen);
    if (!buf)
        return -ENOMEM;
    int fd = p->cfg.fuse_fd;
    int rc;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
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
        ssize_t n = read(fd, buf, blen);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            rc = -errno;
            goto out;
        }
        if (n == 0) {            /* socket stand-in closed */
            rc = -ENODEV;
            goto out;
        }
        struct fuse_in_header h;
        struct fuse_init_in in;
        if ((size_t)n < sizeof h) {
            rc = -EPROTO;
            goto out;
        }
        memcpy(&h, buf, sizeof h);
        /* the 7.36+ fields (flags2) may be absent from an older kernel's INIT */
        memset(&in, 0, sizeof in);
        size_t have = (size_t)n - sizeof h;
        if (h.opcode != FUSE_INIT || h.len != (uint32_t)n ||
            have < offsetof(struct fuse_init_in, flags2)) {
            send_init_reply(fd, h.unique, -EPROTO, NULL, 0);
            rc = -EPROTO;
            goto out;
        }
        memcpy(&in, buf + sizeof h, have < sizeof in ? have : sizeof in);
        struct fuse_init_out o;
        memset(&o, 0, sizeof o);
        o.major = FUSE_KERNEL_VERSION;
        o.minor = FUSE_KERNEL_MINOR_VERSION;
        if (in.major < 7 || (in.major == 7 && in.minor < 28)) {
            send_init_reply(fd, h.unique, -EPROTO, NULL, 0);
            rc = -EPROTO;
            goto out;
        }
        if (in.major > 7) {
            /* the kernel will ask again with major 7 */
            send_init_reply(fd, h.unique, 0, &o, sizeof o);
            continue;
        }
        if (in.minor < o.minor)
            o.minor = in.minor;
        uint64_t offered = in.flags;
        if (in.flags & FUSE_INIT_EXT)
            offered |= (uint64_t)in.flags2 << 32;
        uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO |
                        p->tp->init_flags;
        /* With FOPEN_DIRECT_IO, still allow shared mmap of the file. */
        if (p->cfg.direct_io)
            want |= INIT_DIRECT_IO_ALLOW_MMAP;
        uint64_t granted = offered & want;
        if (granted >> 32)
            granted |= FUSE_INIT_EXT;
        o.flags = (uint32_t)granted;
        o.flags2 = (uint32_t)(granted >> 32);
        o.max_readahead = in.max_readahead < p->cfg.max_write ? in.max_readahead
                                                              : p->cfg.max_write;
        o.max_write = p->cfg.max_write;
        o.max_pages = (uint16_t)((p->cfg.max_write + 4095) / 4096);
        uint32_t bg = p->cfg.max_background ? p->cfg.max_background : 64;
        if (bg > 65535)
            bg = 65535;
        o.max_background = (uint16_t)bg;
        o.congestion_threshold = (uint16_t)(bg * 3 / 4);
        o.time_gran = 1;
        rc = send_init_reply(fd, h.unique, 0, &o, sizeof o);
        if (rc < 0)
            goto out;
        p->max_write = o.max_write;
        p->proto_minor = o.minor;
        p->kernel_flags = offered;
        p->granted_flags = granted;
        p->initialized = 1;
        rc = 0;
        goto out;
    }
out:
    free(buf);
    return rc;
}

/* Notifications are unsolicited messages on the session descriptor: a
 * fuse_out_header with unique 0 and the notify code in .error. */
int klc_session_inval(klc_plane *p, int64_t off, int64_t len)
{
    struct fuse_notify_inval_inode_out o = {.ino = FUSE_ROOT_ID, .off = off, .len = len};
    struct fuse_out_header oh = {sizeof oh + sizeof o, FUSE_NOTIFY_INVAL_INODE, 0};
    struct iovec iov[2] = {{&oh, sizeof oh}, {&o, sizeof o}};
    ssize_t r;
    do
        r = writev(p->cfg.fuse_fd, iov, 2);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

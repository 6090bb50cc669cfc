/* plane_dev.c — the /dev/fuse transport, and the socket stand-in the tests use.
 *
 * dev: nthreads threads, each blocked in read(2) on its own /dev/fuse
 * descriptor (the session's, or a clone made with FUSE_DEV_IOC_CLONE, so the
 * kernel hands each request to whichever thread is idle and the answer goes
 * back on the descriptor it came from).  One read = one whole request; one
 * writev = one whole reply (header + the core's argument bytes, no copy).
 * read: ENOENT = the kernel aborted that request (read the next), ENODEV =
 * unmounted (the thread ends).  writev: ENOENT = the request was interrupted
 * meanwhile (nothing to do).
 *
 * socket: the same loop on one end of a SOCK_SEQPACKET socketpair standing in
 * for /dev/fuse (in-process tests without root): every thread reads the one
 * descriptor (a datagram is read whole by one thread, like a /dev/fuse
 * request), replies are one datagram each, and the peer closing it (EOF)
 * ends the threads as ENODEV would.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include "transport.h"

struct dev_worker {
    klc_plane *p;
    int fd;                /* own /dev/fuse descriptor (clone) or the session's */
    int own_fd;            /* 1 if fd is a clone this worker closes */
    int socket;            /* the socket stand-in: EOF ends the thread */
    uint8_t *req;          /* request buffer: header + args + up to max_write bytes */
    size_t req_len;
    struct klc_io *io;
};

struct dev_state {
    int n;
    struct dev_worker w[];
};

static void send_reply(struct dev_worker *w, const struct klc_reply *rep)
{
    struct fuse_out_header oh = {.len = (uint32_t)(sizeof oh + rep->arg_len),
                                 .error = rep->error, .unique = rep->unique};
    struct iovec iov[2] = {{&oh, sizeof oh}, {(void *)rep->arg, rep->arg_len}};
    ssize_t r;
    do
        r = writev(w->fd, iov, rep->arg_len ? 2 : 1);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno != ENOENT)
        klc_plane_reply_failed(w->p);
}

/* A zero-byte read on the socket: the peer closed it, or sent an empty datagram. */
static int socket_closed(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN | POLLRDHUP};
    return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLRDHUP));
}

static void *serve(void *arg)
{
    struct dev_worker *w = arg;
    struct klc_reply rep;
    for (;;) {
        ssize_t n = read(w->fd, w->req, w->req_len);
        if (n < 0) {
            if (errno == ENOENT || errno == EINTR || errno == EAGAIN)
                continue;        /* aborted request / signal: read the next one */
            break;               /* ENODEV: unmounted; anything else: give up */
        }
        if (n == 0 && (!w->socket || socket_closed(w->fd)))
            break;
        if (klc_io_dispatch_wire(w->io, w->req, (size_t)n, &rep) == KLC_REPLY)
            send_reply(w, &rep);
    }
    return NULL;
}

static void free_state(struct dev_state *st)
{
    for (int i = 0; i < st->n; i++) {
        struct dev_worker *w = &st->w[i];
        if (w->req)
            munmap(w->req, w->req_len);
        klc_io_free(w->io);
        if (w->own_fd && w->fd >= 0)
            close(w->fd);
    }
    free(st);
}

static int start(klc_plane *p, void **state, int socket)
{
    struct klc_session_info si;
    klc_plane_session(p, &si);
    struct dev_state *st = calloc(1, sizeof *st + (size_t)si.nthreads * sizeof st->w[0]);
    if (!st)
        return -ENOMEM;
    st->n = si.nthreads;
    int rc = 0;
    for (int i = 0; i < st->n && rc == 0; i++) {
        struct dev_worker *w = &st->w[i];
        w->p = p;
        w->fd = -1;
        w->socket = socket;
        w->req_len = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in) +
                     si.max_write + 4096;
        w->req_len = (w->req_len + 4095) & ~(size_t)4095;
        w->req = mmap(NULL, w->req_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
        if (w->req == MAP_FAILED) {
            w->req = NULL;
            rc = -ENOMEM;
            break;
        }
        madvise(w->req, w->req_len, MADV_DONTDUMP);   /* written plaintext lands here */
        w->io = klc_io_new(p);
        if (!w->io) {
            rc = -ENOMEM;
            break;
        }
        if (i == 0 || socket) {
            w->fd = si.fuse_fd;
        } else {
            int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
            if (fd < 0) {
                rc = -errno;
                break;
            }
            uint32_t src = (uint32_t)si.fuse_fd;
            if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) != 0) {
                rc = -errno;
                close(fd);
                break;
            }
            w->fd = fd;
            w->own_fd = 1;
        }
    }
    int spawned = 0;
    for (int i = 0; i < st->n && rc == 0; i++) {
        char name[16];
        snprintf(name, sizeof name, "klc-plane-%d", i % 100);
        rc = klc_plane_spawn(p, name, serve, &st->w[i]);
        if (rc == 0)
            spawned++;
    }
    if (rc < 0 && spawned == 0) {
        free_state(st);
        return rc;
    }
    *state = st;      /* the threads already started keep serving; stop() frees after them */
    return rc;
}

static int start_dev(klc_plane *p, void **state)
{
    return start(p, state, 0);
}

static int start_socket(klc_plane *p, void **state)
{
    return start(p, state, 1);
}

static void stop(klc_plane *p, void *state)
{
    if (state)
        free_state(state);
}

const struct klc_transport klc_transport_dev = {
    .name = "dev", .init_flags = 0, .start = start_dev, .stop = stop,
};

const struct klc_transport klc_transport_socket = {
    .name = "socket", .init_flags = 0, .start = start_socket, .stop = stop,
};

/* transport.h — how a FUSE transport feeds the plane's I/O core.
 *
 * The plane is three parts: the session (plane_session.c: mount(2), the
 * FUSE_INIT negotiation, notifications), the I/O core (plane_core.c: one
 * function that answers a request; plane.c: lifecycle, the locked state,
 * range locks) and a transport, which only moves bytes between the kernel and
 * the core.  A transport is one small file: plane_dev.c (/dev/fuse, one cloned
 * descriptor per thread; and the socket stand-in used by the tests), an
 * io_uring transport next to it.
 *
 * A request, as the core sees it (struct klc_req): the fuse_in_header, the
 * opcode's fixed argument struct ("op", e.g. struct fuse_read_in), and the
 * variable payload (a WRITE's data, a LOOKUP's name).  That is exactly how
 * FUSE over io_uring delivers a request (fuse_uring_req_header.in_out = the
 * in header, .op_in = the op struct, the entry's payload buffer = the rest,
 * ring_ent_in_out.payload_sz its length), so an io_uring transport points
 * the three pointers into its per-entry buffers and copies nothing.  A
 * /dev/fuse transport reads one contiguous message and lets klc_req_split()
 * cut it the same way.
 *
 * The answer (struct klc_reply): klc_io_dispatch() fills it and returns
 * KLC_REPLY, or returns KLC_NO_REPLY for FORGET, BATCH_FORGET, INTERRUPT and
 * NOTIFY_REPLY (the kernel expects no answer; sending one is an error).  The
 * transport then sends exactly one fuse_out_header {len = 16 + arg_len,
 * error, unique} followed by arg_len bytes at arg.  If the request carried an
 * output buffer (rq.out != NULL: io_uring's payload buffer, which the kernel
 * reads the reply arguments from), the core leaves the argument bytes there:
 * rep.arg == rq.out whenever arg_len > 0, so the commit needs no copy (READ
 * decrypts straight into it when the read is sector aligned).  Without one,
 * arg points into the core's per-thread state (struct klc_io) and stays valid
 * until the next klc_io_dispatch on that klc_io.
 *
 * Threads: a transport creates every serving thread with klc_plane_spawn()
 * (signals blocked, counted in stats.threads, joined by klc_plane_wait), one
 * struct klc_io per thread (klc_io_new: page-aligned scratch of max_write + 2
 * sectors; not thread-safe, never shared).  Any number of requests may be in
 * the core at once: the core serialises what must be serialised (range locks
 * of overlapping writes, the locked state).  A request may block in the core
 * for up to lock_timeout_ms while the plane is locked, so a transport with
 * several entries per thread (io_uring queues) should expect head-of-line
 * waits while locked, never a deadlock: nothing in the core waits for another
 * request's reply.
 *
 * Ending: a serving thread returns when its channel says the filesystem is
 * gone (/dev/fuse read: ENODEV; the socket: EOF; io_uring: the kernel
 * completes the commands with an error at unmount/abort).  ENOENT from a
 * reply write means the kernel dropped that request (interrupted): not an
 * error.  Other reply failures are counted (klc_plane_reply_failed).  After
 * klc_plane_wait() has joined every spawned thread it calls the transport's
 * stop() to free what start() made.
 *
 * INIT: the session answers FUSE_INIT on the session descriptor before any
 * transport starts (io_uring queues register after INIT, as the kernel
 * requires).  A transport names the 64-bit INIT flags it needs (init_flags,
 * bit 32+ = flags2, e.g. FUSE_OVER_IO_URING = 1 << 41); the session grants
 * those the kernel offers.  start() sees the outcome with klc_plane_session()
 * and fails with -EOPNOTSUPP when the kernel did not grant what it needs.
 */
#ifndef KLC_TRANSPORT_H
#define KLC_TRANSPORT_H
#include <stddef.h>
#include <stdint.h>
#include <linux/fuse.h>
#include "klcrypt.h"
#include "plane.h"

struct klc_io;                  /* per-thread core state (plane_core.c) */

struct klc_req {
    const struct fuse_in_header *in;
    const void *op;             /* the opcode's fixed argument struct */
    uint32_t op_len;            /* bytes at op (checked against the struct the opcode needs);
                                   io_uring: the valid part of op_in (at most
                                   FUSE_URING_OP_IN_OUT_SZ), e.g. in->len - header - payload_sz
                                   where the kernel fills in->len, else the area's size */
    const uint8_t *payload;     /* WRITE data, names; may be NULL when payload_len == 0 */
    uint32_t payload_len;
    uint8_t *out;               /* optional: where the reply's argument bytes must go; page
                                   aligned (an O_DIRECT backing reads straight into it) */
    uint32_t out_cap;           /* bytes at out; >= klc_plane_session().max_write when out != NULL */
};

struct klc_reply {
    uint64_t unique;            /* copy of in->unique */
    int32_t error;              /* 0 or -errno, as fuse_out_header.error */
    const void *arg;            /* reply argument bytes (== rq.out when rq.out was given) */
    uint32_t arg_len;
};

#define KLC_REPLY     0
#define KLC_NO_REPLY  1

/* What a transport needs from the session after INIT. */
struct klc_session_info {
    int fuse_fd;                /* the session's descriptor (INIT was answered on it) */
    int nthreads;               /* the configured number of serving threads */
    uint32_t max_write;         /* negotiated bytes per request */
    uint32_t proto_minor;       /* negotiated minor */
    uint64_t kernel_flags;      /* INIT flags the kernel offered (flags | flags2 << 32) */
    uint64_t granted_flags;     /* INIT flags the plane answered with */
};

struct klc_transport {
    const char *name;           /* shown in stats.transport: "dev", "socket", "uring" */
    uint64_t init_flags;        /* INIT flags this transport asks for (if the kernel offers) */
    /* After INIT: build the transport's state and spawn its threads with
     * klc_plane_spawn.  0, or -errno: if no thread was spawned, start freed
     * everything itself; if some were, they keep serving until unmount and
     * *state is kept for stop(). */
    int (*start)(klc_plane *p, void **state);
    /* After every spawned thread was joined (or start failed half-way, after
     * the threads it did spawn ended): free the state. */
    void (*stop)(klc_plane *p, void *state);
};

/* The built-in transports (plane_dev.c).  klc_transport_uring is defined by
 * the io_uring transport's file if it is compiled in (weak reference). */
extern const struct klc_transport klc_transport_dev;
extern const struct klc_transport klc_transport_socket;
extern const struct klc_transport klc_transport_uring __attribute__((weak));

/* ---- the core, for transports ---------------------------------------- */
struct klc_io *klc_io_new(klc_plane *p);
void klc_io_free(struct klc_io *io);
/* Answer one request (blocking: backing I/O, the engine, a locked plane). */
int klc_io_dispatch(struct klc_io *io, const struct klc_req *rq, struct klc_reply *rep);
/* /dev/fuse wire format (one message of n bytes: header, op struct, payload)
 * split into a klc_req and dispatched.  A message shorter than a header is
 * dropped (KLC_NO_REPLY, counted as malformed); one whose header.len is not n
 * is answered EINVAL. */
int klc_io_dispatch_wire(struct klc_io *io, const uint8_t *buf, size_t n,
                         struct klc_reply *rep);

/* ---- the plane, for transports --------------------------------------- */
/* Start a serving thread (all signals blocked; name shown in /proc). */
int klc_plane_spawn(klc_plane *p, const char *name, void *(*fn)(void *), void *arg);
void klc_plane_session(klc_plane *p, struct klc_session_info *out);
/* A reply could not be delivered (not ENOENT): counted in stats.reply_errors. */
void klc_plane_reply_failed(klc_plane *p);

#endif

/* transport_uring.c — FUSE over io_uring (Linux >= 6.14): the plane's requests
 * arrive as completions on io_uring rings instead of read(2)s of /dev/fuse.
 *
 * What the kernel requires (fs/fuse/dev_uring.c; the ABI is in
 * fuse_uring_abi.h): one queue per possible CPU; a request goes to the queue
 * of the CPU its submitter runs on; the kernel switches the connection from
 * /dev/fuse to the rings only once EVERY queue holds a registered entry, and
 * after an INIT that granted FUSE_OVER_IO_URING it holds every new request
 * until then.  So start() registers entries on all queues before returning.
 *
 * Shape: T serving threads (T = the plane's nthreads, at least one per queue),
 * each with its own ring (SQE128 for the 80-byte command, registered /dev/fuse
 * descriptor, SINGLE_ISSUER + DEFER_TASKRUN: the kernel's hand-over of a
 * request runs as task work in the serving thread when it next waits in
 * io_uring_enter, not as an interrupt of whatever it is doing).  Thread t
 * serves queue t % nq with ENTRIES_PER_THREAD entries (if there are more
 * queues than threads, thread t serves every queue q with q % T == t).  With
 * one entry per thread the kernel hands a request only to a thread that is
 * waiting for one (an armed entry), so a slow request never holds up another
 * behind it in the same thread, the way one read(2) per /dev/fuse thread
 * behaves; see docs/mapping.md for the measurements behind the defaults.
 *
 * One request: the completion of a REGISTER or COMMIT_AND_FETCH says the
 * entry holds a request (in_out = fuse_in_header, op_in = the op struct, the
 * payload = WRITE data); klc_io_dispatch answers it straight from and into the
 * entry's buffers (READ decrypts into the payload, which is where the kernel
 * takes the reply from), and one COMMIT_AND_FETCH both delivers the answer and
 * re-arms the entry.  One io_uring_enter per batch of completions.
 *
 * Ending: at unmount or abort the kernel completes every armed entry with
 * -ENOTCONN (and a COMMIT_AND_FETCH that arrives after that, too); a thread
 * ends when none of its entries is armed any more.  A failed REGISTER makes
 * the kernel fall back to /dev/fuse, where nothing serves: start() reports
 * the failure, the caller unmounts, and the threads end as above.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "fuse_uring_abi.h"
#include "transport.h"

#define ENTRIES_PER_THREAD 1
#define START_TIMEOUT_MS 10000
#define SQE_SIZE 128              /* IORING_SETUP_SQE128 */

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

struct uthread;

struct uent {
    struct klc_uring_req_header *h;
    uint8_t *payload;
    struct iovec iov[2];          /* REGISTER: [0] header, [1] payload */
    uint16_t qid;
    int armed;                    /* a command of this entry is in the kernel */
    uint32_t last_cmd;
    uint64_t commit_id;
    struct uthread *t;
};

struct uring {
    int fd;
    void *sq_map, *sqes_map;
    size_t sq_map_len, sqes_map_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    uint8_t *sqes;
    unsigned sq_entries;
    unsigned to_submit;
};

struct ustate;

struct uthread {
    klc_plane *p;
    struct ustate *st;
    int idx;
    struct uring r;
    struct klc_io *io;
    int nent;
    struct uent *ent;
    uint8_t *mem;                 /* headers + payloads of all entries */
    size_t mem_len;
};

struct ustate {
    int nq, nthr;
    uint32_t payload_len;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int reported, failed, first_error;
    struct uthread t[];
};

/* ---- raw io_uring (four system calls; liburing 2.3 has no uring_cmd helpers) */

static int sys_setup(unsigned entries, struct io_uring_params *prm)
{
    return (int)syscall(__NR_io_uring_setup, entries, prm);
}

static int sys_enter(int fd, unsigned submit, unsigned wait, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, const void *arg, unsigned n)
{
    return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

static void ring_free(struct uring *r)
{
    if (r->sqes_map && r->sqes_map != MAP_FAILED)
        munmap(r->sqes_map, r->sqes_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

/* A disabled ring (its serving thread enables it, becoming its single issuer)
 * with the /dev/fuse descriptor registered as fixed file 0. */
static int ring_init(struct uring *r, unsigned entries, int fuse_fd)
{
    struct io_uring_params prm;
    memset(&prm, 0, sizeof prm);
    prm.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE | IORING_SETUP_R_DISABLED |
                IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    prm.cq_entries = 2 * entries;
    r->fd = sys_setup(entries, &prm);
    if (r->fd < 0)
        return -errno;
    if (!(prm.features & IORING_FEAT_SINGLE_MMAP))
        return -EOPNOTSUPP;     /* every kernel with FUSE over io_uring has it */
    size_t sq_len = prm.sq_off.array + prm.sq_entries * sizeof(unsigned);
    size_t cq_len = prm.cq_off.cqes + prm.cq_entries * sizeof(struct io_uring_cqe);
    r->sq_map_len = sq_len > cq_len ? sq_len : cq_len;
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        return -errno;
    r->sqes_map_len = (size_t)prm.sq_entries * SQE_SIZE;
    r->sqes_map = mmap(NULL, r->sqes_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       r->fd, IORING_OFF_SQES);
    if (r->sqes_map == MAP_FAILED)
        return -errno;
    uint8_t *m = r->sq_map;
    r->sq_head = (unsigned *)(m + prm.sq_off.head);
    r->sq_tail = (unsigned *)(m + prm.sq_off.tail);
    r->sq_mask = (unsigned *)(m + prm.sq_off.ring_mask);
    r->sq_array = (unsigned *)(m + prm.sq_off.array);
    r->cq_head = (unsigned *)(m + prm.cq_off.head);
    r->cq_tail = (unsigned *)(m + prm.cq_off.tail);
    r->cq_mask = (unsigned *)(m + prm.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(m + prm.cq_off.cqes);
    r->sqes = r->sqes_map;
    r->sq_entries = prm.sq_entries;
    int fds[1] = {fuse_fd};
    if (sys_register(r->fd, IORING_REGISTER_FILES, fds, 1) < 0)
        return -errno;
    return 0;
}

/* Queue one FUSE command for entry e (submitted by the next ring_enter). */
static void queue_cmd(struct uring *r, struct uent *e, uint32_t cmd)
{
    unsigned tail = *r->sq_tail;          /* only this thread writes the tail */
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + (size_t)idx * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = 0;                          /* fixed file 0: /dev/fuse */
    sqe->cmd_op = cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == KLC_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct klc_uring_cmd_req *req = (struct klc_uring_cmd_req *)sqe->cmd;
    req->qid = e->qid;
    req->commit_id = cmd == KLC_URING_CMD_COMMIT_AND_FETCH ? e->commit_id : 0;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
    e->armed = 1;
    e->last_cmd = cmd;
}

/* Submit what is queued; with wait, also block until a completion arrives. */
static int ring_enter(struct uring *r, int wait)
{
    for (;;) {
        int n = sys_enter(r->fd, r->to_submit, wait ? 1 : 0,
                          wait ? IORING_ENTER_GETEVENTS : 0);
        if (n >= 0) {
            r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
            if (r->to_submit == 0 || !wait)
                return 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EBUSY) {   /* transient: retry after a breath */
            sched_yield();
            continue;
        }
        return -errno;
    }
}

/* ---- serving --------------------------------------------------------- */

/* Answer the request in entry e and queue its COMMIT_AND_FETCH. */
static void serve_one(struct uthread *t, struct uent *e)
{
    struct klc_uring_req_header *h = e->h;
    const struct fuse_in_header *in = (const struct fuse_in_header *)h->in_out;
    uint32_t payload_len = h->ring_ent_in_out.payload_sz;
    e->commit_id = h->ring_ent_in_out.commit_id;
    /* in->len counts the header, the op struct and the payload (as on /dev/fuse) */
    uint64_t rest = in->len >= sizeof *in ? in->len - sizeof *in : 0;
    uint32_t op_len = 0;
    if (payload_len <= t->st->payload_len && rest >= payload_len &&
        rest - payload_len <= KLC_URING_OP_IN_OUT_SZ)
        op_len = (uint32_t)(rest - payload_len);
    else
        payload_len = 0;   /* inconsistent lengths: the core answers EINVAL (op too short) */
    struct klc_req rq = {
        .in = in, .op = h->op_in, .op_len = op_len,
        .payload = e->payload, .payload_len = payload_len,
        .out = e->payload, .out_cap = t->st->payload_len,
    };
    struct klc_reply rep;
    struct fuse_out_header oh;
    if (klc_io_dispatch(t->io, &rq, &rep) == KLC_NO_REPLY) {
        /* FORGET/INTERRUPT never come through the rings; should one, the
         * kernel still waits for a commit of this entry: answer it. */
        oh = (struct fuse_out_header){.len = sizeof oh, .error = 0, .unique = in->unique};
        h->ring_ent_in_out.payload_sz = 0;
    } else {
        if (rep.arg_len && rep.arg != e->payload)
            memmove(e->payload, rep.arg, rep.arg_len);   /* the core promises no copy; be safe */
        oh = (struct fuse_out_header){.len = (uint32_t)(sizeof oh + rep.arg_len),
                                      .error = rep.error, .unique = rep.unique};
        h->ring_ent_in_out.payload_sz = rep.arg_len;
    }
    memcpy(h->in_out, &oh, sizeof oh);
    queue_cmd(&t->r, e, KLC_URING_CMD_COMMIT_AND_FETCH);
}

static void report(struct uthread *t, int err)
{
    struct ustate *st = t->st;
    pthread_mutex_lock(&st->mu);
    st->reported++;
    if (err) {
        st->failed++;
        if (!st->first_error)
            st->first_error = err;
    }
    pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->mu);
}

static void *serve(void *arg)
{
    struct uthread *t = arg;
    struct uring *r = &t->r;
    /* This thread becomes the ring's single issuer. */
    int err = sys_register(r->fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0 ? -errno : 0;
    if (!err) {
        for (int i = 0; i < t->nent; i++)
            queue_cmd(r, &t->ent[i], KLC_URING_CMD_REGISTER);
        err = ring_enter(r, 0);
    }
    if (!err) {
        /* A refused REGISTER completes at once; a request (res 0) may already be
         * there too and is served below. */
        unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++)
            if (r->cqes[head & *r->cq_mask].res < 0) {
                err = r->cqes[head & *r->cq_mask].res;
                break;
            }
    }
    report(t, err);   /* entries that did register end at unmount like the rest */
    int armed = 0;
    for (int i = 0; i < t->nent; i++)
        armed += t->ent[i].armed;
    if (err == 0 || armed) {
        for (;;) {
            unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
            for (; head != tail; head++) {
                struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
                struct uent *e = (struct uent *)(uintptr_t)c->user_data;
                int res = c->res;
                __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
                e->armed = 0;
                if (res == 0) {
                    serve_one(t, e);
                } else if (res == -EAGAIN || res == -EINTR) {
                    queue_cmd(r, e, e->last_cmd);      /* not taken: send it again */
                }
                /* any other error (-ENOTCONN at unmount/abort): the entry is done */
            }
            armed = 0;
            for (int i = 0; i < t->nent; i++)
                armed += t->ent[i].armed;
            if (!armed)
                break;
            if (ring_enter(r, 1) < 0) {
                if (r->to_submit == 0 && !armed)
                    break;
                /* the ring itself failed (should not happen): stop serving;
                 * the unmount's abort ends the kernel's side */
                break;
            }
        }
    }
    return NULL;
}

/* ---- start/stop -------------------------------------------------------- */

/* Number of possible CPUs (the kernel's number of queues): the set in
 * /sys/devices/system/cpu/possible, e.g. "0-1" or "0-3,6". */
static int possible_cpus(void)
{
    int n = 0;
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    if (f) {
        int a, b;
        char sep;
        for (;;) {
            if (fscanf(f, "%d", &a) != 1)
                break;
            b = a;
            int c = fgetc(f);
            if (c == '-') {
                if (fscanf(f, "%d", &b) != 1)
                    break;
                c = fgetc(f);
            }
            if (b >= a && b - a < 65536)
                n += b - a + 1;
            sep = (char)c;
            if (sep != ',')
                break;
        }
        fclose(f);
    }
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_CONF);
        n = c > 0 ? (int)c : 1;
    }
    return n;
}

static void free_state(struct ustate *st)
{
    for (int i = 0; i < st->nthr; i++) {
        struct uthread *t = &st->t[i];
        ring_free(&t->r);
        if (t->mem)
            munmap(t->mem, t->mem_len);
        free(t->ent);
        klc_io_free(t->io);
    }
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->cv);
    free(st);
}

static int thread_setup(struct uthread *t, int fuse_fd, uint32_t payload_len)
{
    size_t hdr = (sizeof(struct klc_uring_req_header) + 63) & ~(size_t)63;
    size_t hdr_total = ((size_t)t->nent * hdr + 4095) & ~(size_t)4095;
    t->mem_len = hdr_total + (size_t)t->nent * payload_len;
    t->mem = mmap(NULL, t->mem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (t->mem == MAP_FAILED) {
        t->mem = NULL;
        return -ENOMEM;
    }
    madvise(t->mem, t->mem_len, MADV_DONTDUMP);   /* plaintext passes through here */
    for (int i = 0; i < t->nent; i++) {
        struct uent *e = &t->ent[i];
        e->t = t;
        e->h = (struct klc_uring_req_header *)(t->mem + (size_t)i * hdr);
        e->payload = t->mem + hdr_total + (size_t)i * payload_len;
        e->iov[0] = (struct iovec){e->h, sizeof *e->h};
        e->iov[1] = (struct iovec){e->payload, payload_len};
    }
    t->io = klc_io_new(t->p);
    if (!t->io)
        return -ENOMEM;
    return ring_init(&t->r, (unsigned)t->nent * 2, fuse_fd);
}

static int start(klc_plane *p, void **state)
{
    struct klc_session_info si;
    klc_plane_session(p, &si);
    if (!(si.granted_flags & ((uint64_t)KLC_FUSE_INIT2_OVER_IO_URING << 32)))
        return -EOPNOTSUPP;
    int nq = possible_cpus();
    int nthr = si.nthreads > nq ? si.nthreads : nq;
    if (nthr > KLC_PLANE_MAX_THREADS)
        nthr = KLC_PLANE_MAX_THREADS;
    struct ustate *st = calloc(1, sizeof *st + (size_t)nthr * sizeof st->t[0]);
    if (!st)
        return -ENOMEM;
    st->nq = nq;
    st->nthr = nthr;
    /* the kernel wants room for max(8 KiB, max_write, max_pages pages) */
    uint32_t pl = si.max_write > 8192 ? si.max_write : 8192;
    st->payload_len = (pl + 4095) & ~(uint32_t)4095;
    pthread_mutex_init(&st->mu, NULL);
    pthread_cond_init(&st->cv, NULL);
    for (int i = 0; i < nthr; i++)
        st->t[i].r.fd = -1;
    int rc = 0;
    for (int i = 0; i < nthr && rc == 0; i++) {
        struct uthread *t = &st->t[i];
        t->p = p;
        t->st = st;
        t->idx = i;
        /* the queues this thread serves */
        int nqt = 0;
        for (int q = 0; q < nq; q++)
            nqt += nthr >= nq ? q == i % nq : q % nthr == i;
        t->nent = nqt * ENTRIES_PER_THREAD;
        /* Not pinned to the queue's CPU (libfuse pins): a queue gets the requests
         * of the CPU the submitter runs on, and with the submitter busy there a
         * pinned thread would take turns with it instead of encrypting on another
         * core; unpinned, the scheduler moves it. */
        t->ent = calloc((size_t)t->nent, sizeof *t->ent);
        if (!t->ent) {
            rc = -ENOMEM;
            break;
        }
        int k = 0;
        for (int q = 0; q < nq; q++)
            if (nthr >= nq ? q == i % nq : q % nthr == i)
                for (int d = 0; d < ENTRIES_PER_THREAD; d++)
                    t->ent[k++].qid = (uint16_t)q;
        rc = thread_setup(t, si.fuse_fd, st->payload_len);
    }
    if (rc < 0) {
        free_state(st);
        return rc;
    }
    int spawned = 0;
    for (int i = 0; i < nthr && rc == 0; i++) {
        char name[16];
        snprintf(name, sizeof name, "klc-uring-%d", i % 100);
        rc = klc_plane_spawn(p, name, serve, &st->t[i]);
        if (rc == 0)
            spawned++;
    }
    if (spawned == 0) {
        free_state(st);
        return rc;
    }
    *state = st;
    /* Wait until every spawned thread registered its entries (or failed to). */
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += START_TIMEOUT_MS / 1000;
    pthread_mutex_lock(&st->mu);
    while (st->reported < spawned)
        if (pthread_cond_timedwait(&st->cv, &st->mu, &dl) == ETIMEDOUT)
            break;
    int ok = st->reported == spawned && st->failed == 0;
    int err = st->first_error ? st->first_error : -ETIMEDOUT;
    pthread_mutex_unlock(&st->mu);
    if (rc < 0)
        return rc;
    return ok ? 0 : err;
}

static void stop(klc_plane *p, void *state)
{
    if (state)
        free_state(state);
}

const struct klc_transport klc_transport_uring = {
    .name = "uring",
    .init_flags = (uint64_t)KLC_FUSE_INIT2_OVER_IO_URING << 32,
    .start = start,
    .stop = stop,
};

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
 * Shape: T serving threads (T = min(the plane's nthreads, queues), so a
 * thread per CPU queue on small machines), each with its own ring (SQE128 for
 * the 80-byte command, registered /dev/fuse descriptor, SINGLE_ISSUER +
 * DEFER_TASKRUN: the kernel's hand-over of a request runs as task work in the
 * serving thread when it next waits in io_uring_enter, not as an interrupt of
 * whatever it is doing).  Thread t registers E entries on each queue it serves
 * (queue q with q % T == t; E = entries_per_queue(), up to 8, so up to 8
 * requests of a queue are handed over without waiting for a commit).
 *
 * One request: the completion of a REGISTER or COMMIT_AND_FETCH says the
 * entry holds a request (in_out = fuse_in_header, op_in = the op struct, the
 * payload = WRITE data); klc_io_dispatch answers it straight from and into the
 * entry's buffers (READ decrypts into the payload, which is where the kernel
 * takes the reply from), and one COMMIT_AND_FETCH both delivers the answer and
 * re-arms the entry.
 *
 * Small requests (4 KiB random I/O) are served in batches by the thread that
 * got them: one io_uring_enter submits every commit of a batch and waits for
 * the next, so a queue costs one thread and a few system calls per batch, and
 * the submitter (fio, a filesystem) keeps the other CPUs.  But the kernel
 * puts a request on the queue of the CPU its submitter runs on, so one
 * process's requests all reach one thread: for big requests (>= SHARE_MIN, a
 * sequential stream's 1 MiB reads and writes, which a single thread would
 * serve one after another) that would leave the other cores idle.  Those go
 * to a shared list instead, and an idle thread is woken (an IORING_OP_MSG_RING
 * message on its ring) to take one; it answers the request and commits the
 * entry on its own ring.  The kernel allows that: COMMIT_AND_FETCH finds the
 * request by (qid, commit_id), and the entry then belongs to the ring that
 * committed it.  So entries move between threads, and a thread's number of
 * commands in the kernel ("inflight") can fall to zero while the plane runs;
 * a thread then waits on its ring for a wake message.  A small request that
 * reaches a ring on an entry another thread registered is passed back to that
 * thread (inbox_push), which commits it on its own ring: the entry goes home,
 * so a queue's small requests keep being batched by the queue's own thread.
 * Measurements of the shapes tried (one entry per thread, batches only,
 * sharing without and with the way home): docs/mapping.md.  SHARE_MIN is the
 * engine pool's split threshold (pool.c), below which a second core does not
 * pay; it was not tuned separately.
 *
 * Ending: at unmount or abort the kernel completes every armed command with
 * -ENOTCONN (and a COMMIT_AND_FETCH that arrives after that, too).  "live"
 * counts the entries not yet ended that way (armed, or in userspace being
 * answered); when it reaches zero the last thread to end an entry sets
 * "stopping" and wakes every sleeping thread, and all threads return.  A
 * failed REGISTER makes the kernel fall back to /dev/fuse, where nothing
 * serves: start() reports the failure, the caller unmounts, and the threads
 * end as above.
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

#define MAX_ENTRIES_PER_QUEUE 8   /* see entries_per_queue() */
#define SHARE_MIN (64 * 1024)     /* a request of at least this many bytes may go to another thread */
#define START_TIMEOUT_MS 10000
#define IDLE_CHECK_MS 200         /* a thread with no command in the kernel looks at "stopping" */
#define SQE_SIZE 128              /* IORING_SETUP_SQE128 */
#define UD_WAKE 0                 /* user_data of a wake message (MSG_RING) */
#define UD_MSG 1                  /* user_data of the MSG_RING command itself (its errors) */

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

struct uent {
    struct klc_uring_req_header *h;
    uint8_t *payload;
    struct iovec iov[2];          /* REGISTER: [0] header, [1] payload */
    uint16_t qid;
    uint32_t last_cmd;
    uint64_t commit_id;
    struct uthread *home;         /* the thread that registered it */
    struct uent *next;            /* in a batch, an inbox or the shared list */
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
    int nent;                     /* entries this thread registers (they may move later) */
    struct uent *ent;
    uint8_t *mem;                 /* headers + payloads of those entries */
    size_t mem_len;
    int inflight;                 /* commands in this thread's ring (only it touches this) */
    int sleeping;                 /* atomic: about to wait, or waiting, in io_uring_enter */
    int wakes_queued;             /* wake messages queued on this ring, not yet submitted */
    int dead;                     /* atomic: its ring failed; it serves nothing more */
    pthread_mutex_t imu;          /* inbox: small requests that reached another thread's */
    struct uent *inbox;           /*   ring on one of this thread's entries (see harvest) */
    int ninbox;                   /* atomic reads; written under imu */
};

struct ustate {
    int nq, nthr;
    uint32_t payload_len;
    pthread_mutex_t mu;           /* start-up reports */
    pthread_cond_t cv;
    int reported, failed, first_error;
    pthread_mutex_t wmu;          /* the shared list of big requests */
    struct uent *work_head, *work_tail;
    int nwork;                    /* atomic reads; written under wmu */
    int live;                     /* atomic: entries not ended (armed or being answered) */
    int stopping;                 /* atomic: live reached zero */
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
    e->last_cmd = cmd;
}

/* Queue a wake message for ring `target_fd`: a CQE with user_data UD_WAKE. */
static void queue_wake(struct uring *r, int target_fd)
{
    unsigned tail = *r->sq_tail;
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + (size_t)idx * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    sqe->opcode = IORING_OP_MSG_RING;
    sqe->flags = IOSQE_CQE_SKIP_SUCCESS;
    sqe->fd = target_fd;
    sqe->addr = IORING_MSG_DATA;
    sqe->len = 0;                         /* the message CQE's res */
    sqe->off = UD_WAKE;                   /* the message CQE's user_data */
    sqe->user_data = UD_MSG;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
}

/* Submit what is queued and wait at most ms milliseconds for a completion
 * (for a thread with no command of its own in the kernel, which then waits
 * only for wake messages: the timeout makes it look at "stopping" again even
 * if no message comes). */
static int ring_enter_timeout(struct uring *r, unsigned ms)
{
    struct __kernel_timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long long)(ms % 1000) * 1000000};
    struct io_uring_getevents_arg ga = {.sigmask = 0, .sigmask_sz = 8 /* kernel sigset_t; no mask given */,
                                        .ts = (uint64_t)(uintptr_t)&ts};
    for (;;) {
        int n = (int)syscall(__NR_io_uring_enter, r->fd, r->to_submit, 1,
                             IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &ga, sizeof ga);
        if (n >= 0) {
            r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
            return 0;
        }
        if (errno == ETIME)
            return 0;
        if (errno == EINTR || errno == EAGAIN || errno == EBUSY)
            continue;
        return -errno;
    }
}

/* Submit what is queued and run the ring's deferred task work (so the
 * requests handed over meanwhile show up as CQEs); with wait, block until at
 * least one completion is there. */
static int ring_enter(struct uring *r, int wait)
{
    for (;;) {
        int n = sys_enter(r->fd, r->to_submit, wait ? 1 : 0, IORING_ENTER_GETEVENTS);
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

/* Wake thread u if it sleeps (the message goes out with t's next enter);
 * 1 if a message was queued. */
static int wake_one(struct uthread *t, struct uthread *u)
{
    if (u != t && u->r.fd >= 0 && __atomic_exchange_n(&u->sleeping, 0, __ATOMIC_SEQ_CST)) {
        queue_wake(&t->r, u->r.fd);
        t->wakes_queued++;
        return 1;
    }
    return 0;
}

/* Wake up to n sleeping threads other than t (their next io_uring_enter
 * returns with a wake message).  The message commands are submitted by t's
 * next ring_enter. */
static void wake_others(struct uthread *t, int n)
{
    struct ustate *st = t->st;
    for (int i = 1; i < st->nthr && n > 0; i++)
        n -= wake_one(t, &st->t[(t->idx + i) % st->nthr]);
}

/* An entry's command ended with an error: it is out of service for good. */
static void entry_ended(struct uthread *t)
{
    if (__atomic_sub_fetch(&t->st->live, 1, __ATOMIC_SEQ_CST) == 0) {
        __atomic_store_n(&t->st->stopping, 1, __ATOMIC_SEQ_CST);
        wake_others(t, t->st->nthr);
    }
}

/* Bytes a request moves (a READ's size, a WRITE's data): what makes it worth
 * handing to another thread. */
static uint32_t request_bytes(const struct uent *e)
{
    const struct fuse_in_header *in = (const struct fuse_in_header *)e->h->in_out;
    if (in->opcode == FUSE_READ)
        return ((const struct fuse_read_in *)e->h->op_in)->size;
    return e->h->ring_ent_in_out.payload_sz;
}

static void share_push(struct ustate *st, struct uent *e)
{
    e->next = NULL;
    pthread_mutex_lock(&st->wmu);
    if (st->work_tail)
        st->work_tail->next = e;
    else
        st->work_head = e;
    st->work_tail = e;
    __atomic_add_fetch(&st->nwork, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&st->wmu);
}

/* A small request on an entry that another thread registered goes back to
 * that thread, which answers it and commits the entry on its own ring, so
 * the entry returns home.  Without this, entries that big requests moved
 * (see the top of the file) would stay wherever they were last committed,
 * and a queue's small requests could end up served by a thread that also
 * serves another queue, or that shares a CPU with the submitter. */
static void inbox_push(struct uthread *u, struct uent *e)
{
    pthread_mutex_lock(&u->imu);
    e->next = u->inbox;
    u->inbox = e;
    __atomic_add_fetch(&u->ninbox, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&u->imu);
}

static struct uent *inbox_take(struct uthread *t)
{
    if (!__atomic_load_n(&t->ninbox, __ATOMIC_SEQ_CST))
        return NULL;
    pthread_mutex_lock(&t->imu);
    struct uent *e = t->inbox;
    t->inbox = NULL;
    __atomic_store_n(&t->ninbox, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&t->imu);
    return e;
}

static struct uent *share_pop(struct ustate *st)
{
    if (!__atomic_load_n(&st->nwork, __ATOMIC_SEQ_CST))
        return NULL;
    pthread_mutex_lock(&st->wmu);
    struct uent *e = st->work_head;
    if (e) {
        st->work_head = e->next;
        if (!st->work_head)
            st->work_tail = NULL;
        __atomic_sub_fetch(&st->nwork, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&st->wmu);
    return e;
}

/* Take every completion off t's ring: requests go to *batch (small ones) or
 * the shared list (big ones, when there are other threads); commands the
 * kernel did not take are sent again; ended entries are counted.  Returns the
 * number of requests put on the shared list. */
static int harvest(struct uthread *t, struct uent **batch)
{
    struct uring *r = &t->r;
    struct ustate *st = t->st;
    int shared = 0;
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
        uint64_t ud = c->user_data;
        int res = c->res;
        __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
        if (ud == UD_WAKE || ud == UD_MSG)
            continue;             /* a wake message, or a failed one (the target ended) */
        struct uent *e = (struct uent *)(uintptr_t)ud;
        t->inflight--;
        if (res == 0) {
            if (st->nthr > 1 && request_bytes(e) >= SHARE_MIN) {
                share_push(st, e);
                shared++;
            } else if (e->home != t && !__atomic_load_n(&e->home->dead, __ATOMIC_SEQ_CST)) {
                inbox_push(e->home, e);
                wake_one(t, e->home);
            } else {
                e->next = *batch;
                *batch = e;
            }
        } else if (res == -EAGAIN || res == -EINTR) {
            queue_cmd(r, e, e->last_cmd);      /* not taken: send it again */
            t->inflight++;
        } else {
            entry_ended(t);       /* -ENOTCONN at unmount/abort: the entry is done */
        }
    }
    return shared;
}

static void *serve(void *arg)
{
    struct uthread *t = arg;
    struct uring *r = &t->r;
    struct ustate *st = t->st;
    /* This thread becomes the ring's single issuer. */
    int err = sys_register(r->fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0 ? -errno : 0;
    if (!err) {
        for (int i = 0; i < t->nent; i++)
            queue_cmd(r, &t->ent[i], KLC_URING_CMD_REGISTER);
        err = ring_enter(r, 0);
        if (!err)
            t->inflight = t->nent;
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
    } else {
        for (int i = 0; i < t->nent; i++)
            entry_ended(t);       /* never registered */
    }
    report(t, err);   /* entries that did register end at unmount like the rest */
    struct uent *batch = NULL, *pending = NULL;
    for (;;) {
        int shared = harvest(t, &batch);
        if (shared > 0)
            wake_others(t, shared - 1 + (batch != NULL));   /* this thread takes one too */
        struct uent *in = inbox_take(t);
        while (in) {
            struct uent *n = in->next;
            in->next = batch;
            batch = in;
            in = n;
        }
        if (t->wakes_queued) {
            /* send the wake messages now, not after this thread's own work */
            t->wakes_queued = 0;
            if (ring_enter(r, 0) < 0)
                break;
        }
        if (batch) {
            /* small requests: answer the whole batch, then one enter commits them all */
            while (batch) {
                struct uent *e = batch;
                batch = e->next;
                serve_one(t, e);
                t->inflight++;
            }
            continue;     /* the commits go out with the next enter (below) */
        }
        struct uent *e = share_pop(st);
        if (e) {
            pending = e;
            /* A big request.  First send the commits queued so far and take
             * what the kernel handed to this ring meanwhile (it stays invisible
             * to the other threads until this thread enters the kernel), so
             * the other threads can share it while this one is busy. */
            if (ring_enter(r, 0) < 0)
                break;
            int more = harvest(t, &batch);
            if (more > 0)
                wake_others(t, more);
            if (t->wakes_queued) {
                t->wakes_queued = 0;
                if (ring_enter(r, 0) < 0)
                    break;
            }
            pending = NULL;
            serve_one(t, e);
            t->inflight++;
            continue;
        }
        if (__atomic_load_n(&st->stopping, __ATOMIC_SEQ_CST) && t->inflight == 0)
            break;
        /* Nothing left to answer: one io_uring_enter submits the commits (and
         * wake messages) queued so far and sleeps until a completion or a wake
         * message (it returns at once if the kernel handed requests over
         * meanwhile).  Announce the sleep first, then look once more, so a push
         * that raced with us is seen either here or by the pusher (which then
         * wakes us). */
        __atomic_store_n(&t->sleeping, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&st->nwork, __ATOMIC_SEQ_CST) ||
            __atomic_load_n(&t->ninbox, __ATOMIC_SEQ_CST) ||
            *r->cq_head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) ||
            (__atomic_load_n(&st->stopping, __ATOMIC_SEQ_CST) && t->inflight == 0)) {
            __atomic_store_n(&t->sleeping, 0, __ATOMIC_SEQ_CST);
            if (r->to_submit && ring_enter(r, 0) < 0)
                break;
            continue;
        }
        int rc = t->inflight ? ring_enter(r, 1) : ring_enter_timeout(r, IDLE_CHECK_MS);
        __atomic_store_n(&t->sleeping, 0, __ATOMIC_SEQ_CST);
        if (rc < 0)
            break;
    }
    if (!__atomic_load_n(&st->stopping, __ATOMIC_SEQ_CST)) {
        /* The ring itself failed (should not happen): stop serving.  Requests
         * this thread holds go to the shared list, where the other threads
         * answer them (their commits go through their own rings), and so does
         * whatever reaches the inbox from now on (harvest checks "dead").  The
         * commands in this ring are lost: count those entries as ended, so the
         * other threads still stop when the rest end; the unmount's abort ends
         * the kernel's side. */
        __atomic_store_n(&t->dead, 1, __ATOMIC_SEQ_CST);
        struct uent *in = inbox_take(t);
        if (pending)
            share_push(st, pending);
        for (struct uent *l = batch; l;) {
            struct uent *n = l->next;
            share_push(st, l);
            l = n;
        }
        for (; in;) {
            struct uent *n = in->next;
            share_push(st, in);
            in = n;
        }
        for (; t->inflight > 0; t->inflight--)
            entry_ended(t);
    }
    /* Submit what is still queued (wake messages of the last ended entry). */
    if (r->to_submit)
        ring_enter(r, 0);
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
        pthread_mutex_destroy(&t->imu);
    }
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->cv);
    pthread_mutex_destroy(&st->wmu);
    free(st);
}

static int thread_setup(struct uthread *t, int fuse_fd, uint32_t payload_len,
                        unsigned ring_entries)
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
        e->h = (struct klc_uring_req_header *)(t->mem + (size_t)i * hdr);
        e->payload = t->mem + hdr_total + (size_t)i * payload_len;
        e->iov[0] = (struct iovec){e->h, sizeof *e->h};
        e->iov[1] = (struct iovec){e->payload, payload_len};
    }
    t->io = klc_io_new(t->p);
    if (!t->io)
        return -ENOMEM;
    return ring_init(&t->r, ring_entries, fuse_fd);
}

/* Entries registered per queue: enough that a queue rarely makes a request
 * wait for a commit (fio's QD16 on one CPU keeps 8 in the daemon and 8 handed
 * over at commit, COMMIT_AND_FETCH taking the next one at once), while the
 * payload buffers (max_write each, faulted in on first use) stay bounded on
 * machines with many CPUs: 8 per queue up to 4 queues, then fewer, at least 1. */
static int entries_per_queue(int nq)
{
    int e = 32 / nq;
    return e > MAX_ENTRIES_PER_QUEUE ? MAX_ENTRIES_PER_QUEUE : e < 1 ? 1 : e;
}

static int start(klc_plane *p, void **state)
{
    struct klc_session_info si;
    klc_plane_session(p, &si);
    if (!(si.granted_flags & ((uint64_t)KLC_FUSE_INIT2_OVER_IO_URING << 32)))
        return -EOPNOTSUPP;
    int nq = possible_cpus();
    /* One thread per queue at most: big requests are shared between threads
     * (see the top of this file), small ones are cheapest served in batches. */
    int nthr = si.nthreads < nq ? si.nthreads : nq;
    if (nthr < 1)
        nthr = 1;
    if (nthr > KLC_PLANE_MAX_THREADS)
        nthr = KLC_PLANE_MAX_THREADS;
    int epq = entries_per_queue(nq);
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
    pthread_mutex_init(&st->wmu, NULL);
    /* Every entry may end up on one ring (entries move to the ring that commits
     * them), plus a wake message per other thread. */
    unsigned total = (unsigned)nq * (unsigned)epq;
    unsigned ring_entries = 8;
    while (ring_entries < total + (unsigned)nthr + 2)
        ring_entries <<= 1;
    for (int i = 0; i < nthr; i++) {
        st->t[i].r.fd = -1;
        pthread_mutex_init(&st->t[i].imu, NULL);
    }
    int rc = 0;
    for (int i = 0; i < nthr && rc == 0; i++) {
        struct uthread *t = &st->t[i];
        t->p = p;
        t->st = st;
        t->idx = i;
        /* the queues this thread serves: q % nthr == i */
        int nqt = 0;
        for (int q = 0; q < nq; q++)
            nqt += q % nthr == i;
        t->nent = nqt * epq;
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
            if (q % nthr == i)
                for (int d = 0; d < epq; d++) {
                    t->ent[k].home = t;
                    t->ent[k++].qid = (uint16_t)q;
                }
        rc = thread_setup(t, si.fuse_fd, st->payload_len, ring_entries);
    }
    if (rc < 0) {
        free_state(st);
        return rc;
    }
    st->live = (int)total;
    int spawned = 0;
    for (int i = 0; i < nthr && rc == 0; i++) {
        char name[16];
        snprintf(name, sizeof name, "klc-uring-%d", i % 100);
        rc = klc_plane_spawn(p, name, serve, &st->t[i]);
        if (rc == 0)
            spawned++;
    }
    /* Entries of threads that never started never register: not live. */
    for (int i = spawned; i < nthr; i++)
        if (__atomic_sub_fetch(&st->live, st->t[i].nent, __ATOMIC_SEQ_CST) == 0)
            __atomic_store_n(&st->stopping, 1, __ATOMIC_SEQ_CST);
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

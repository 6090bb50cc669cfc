/* plane_internal.h — the plane's state shared by plane.c (lifecycle, locked
 * state, range locks), plane_session.c (mount, INIT) and plane_core.c (the
 * request answers).  Transports do not include this: they see transport.h.
 */
#ifndef KLC_PLANE_INTERNAL_H
#define KLC_PLANE_INTERNAL_H
#include <pthread.h>
#include <time.h>
#include "transport.h"

#define ADD(field, v) __atomic_add_fetch(&p->st.field, (v), __ATOMIC_RELAXED)

/* A write's sectors [first, last], held while it read-modify-writes them. */
struct range {
    uint64_t first, last;
    struct range *next;
};

struct klc_plane {
    struct klc_plane_config cfg;
    const struct klc_transport *tp;
    void *tp_state;
    int tp_started;           /* tp->start succeeded (tp->stop owed after the join) */

    /* session (plane_session.c) */
    uint32_t max_write;       /* negotiated */
    uint32_t proto_minor;
    uint64_t kernel_flags;    /* INIT flags offered (flags | flags2 << 32) */
    uint64_t granted_flags;   /* INIT flags answered */
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

    /* serving threads (klc_plane_spawn) */
    pthread_t tids[KLC_PLANE_MAX_THREADS];
    int nspawned;
    int running;              /* under mu */
    pthread_cond_t ended;

    int wb_err;               /* first backing write/sync errno, latched (atomic) */
    uint64_t size;            /* bytes reported (atomic; klc_plane_set_size) */
    int allow_discards;       /* atomic; klc_plane_set_discards */
    int backing_blk;          /* the backing store is a block device (BLKDISCARD) */
    int backing_direct;       /* bfd is the plane's own O_DIRECT descriptor */
    int bfd;                  /* the descriptor all backing I/O uses (cfg.backing_fd or own) */

    struct klc_plane_stats st;  /* counters, updated with atomics */
};

/* plane.c */
klc_xts *klc_ctx_get(klc_plane *p);
void klc_ctx_put(klc_plane *p);
int klc_ctx_failed(klc_plane *p, klc_xts *c, int rc);
void klc_range_lock(klc_plane *p, struct range *r);
void klc_range_unlock(klc_plane *p, struct range *r);
void klc_deadline_after(struct timespec *ts, uint32_t ms);

static inline uint64_t klc_size(klc_plane *p)
{
    return __atomic_load_n(&p->size, __ATOMIC_ACQUIRE);
}

/* plane_session.c: FUSE_NOTIFY_INVAL_INODE of the file (off < 0: attributes only). */
int klc_session_inval(klc_plane *p, int64_t off, int64_t len);

#endif

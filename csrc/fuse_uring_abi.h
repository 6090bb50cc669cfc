/* fuse_uring_abi.h — the FUSE-over-io_uring kernel ABI (FUSE 7.42, Linux >= 6.14).
 *
 * Debian 12's <linux/fuse.h> (7.38) predates it, so the layout is written out
 * here from the kernel's include/uapi/linux/fuse.h, under klcrypt's own names
 * (a newer system header defining the kernel's names cannot clash).  The
 * static asserts pin every size and offset the kernel relies on.
 *
 * The protocol, as fs/fuse/dev_uring.c implements it:
 *  - The daemon answers FUSE_INIT with FUSE_OVER_IO_URING (init flag bit 41 =
 *    flags2 bit 9) only if the kernel offered it there (it does when
 *    /sys/module/fuse/parameters/enable_uring is Y).  From then on new
 *    requests BLOCK in the kernel until the ring is ready, or until a
 *    REGISTER fails (which switches the connection back to /dev/fuse).
 *  - One queue per possible CPU (qid 0..num_possible_cpus-1); a request goes
 *    to the queue of the CPU its submitter runs on.  The ring is ready once
 *    every queue holds at least one registered entry.
 *  - An entry is registered with an IORING_OP_URING_CMD SQE on the /dev/fuse
 *    descriptor (SQE128 ring; cmd_op = KLC_URING_CMD_REGISTER; sqe->addr = an
 *    iovec[2]: [0] a struct klc_uring_req_header, [1] a payload buffer of at
 *    least max(8192, max_write, max_pages * 4096) bytes; sqe->len = 2; the
 *    80-byte command area holds a struct klc_uring_cmd_req with the qid).
 *    The CQE (res 0) arrives when a request is in the entry: in_out holds the
 *    fuse_in_header, op_in the first argument (fuse_read_in, fuse_write_in,
 *    ...), the payload the rest (WRITE data), ring_ent_in_out.payload_sz its
 *    length and .commit_id the id to answer with.
 *  - The answer: fuse_out_header in in_out, every reply argument in the
 *    payload, payload_sz = their length; then a COMMIT_AND_FETCH SQE (same
 *    entry; commit_id in the command) both delivers it and re-arms the entry.
 *  - Teardown (unmount, abort): every armed entry completes with -ENOTCONN,
 *    and so does a COMMIT_AND_FETCH sent after the queues stopped.
 *  - FORGET and INTERRUPT still go through /dev/fuse.
 */
#ifndef KLC_FUSE_URING_ABI_H
#define KLC_FUSE_URING_ABI_H
#include <stddef.h>
#include <stdint.h>

/* FUSE_OVER_IO_URING (1ULL << 41) as a bit of fuse_init_in/out.flags2 */
#define KLC_FUSE_INIT2_OVER_IO_URING (1u << (41 - 32))
#define KLC_FUSE_URING_MINOR 42               /* protocol minor that introduced it */

#define KLC_URING_IN_OUT_HEADER_SZ 128
#define KLC_URING_OP_IN_OUT_SZ 128

struct klc_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;       /* kernel -> daemon: quote it in COMMIT_AND_FETCH */
    uint32_t payload_sz;      /* bytes used in the payload buffer (both ways) */
    uint32_t padding;
    uint64_t reserved;
};

struct klc_uring_req_header {
    char in_out[KLC_URING_IN_OUT_HEADER_SZ];   /* fuse_in_header / fuse_out_header */
    char op_in[KLC_URING_OP_IN_OUT_SZ];        /* the opcode's first argument */
    struct klc_uring_ent_in_out ring_ent_in_out;
};

enum klc_uring_cmd {
    KLC_URING_CMD_INVALID = 0,
    KLC_URING_CMD_REGISTER = 1,           /* register the entry's buffers, fetch a request */
    KLC_URING_CMD_COMMIT_AND_FETCH = 2,   /* answer the entry's request, fetch the next */
};

/* In the 80-byte command area of a 128-byte SQE. */
struct klc_uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct klc_uring_ent_in_out) == 32, "fuse_uring_ent_in_out");
_Static_assert(sizeof(struct klc_uring_req_header) == 288, "fuse_uring_req_header");
_Static_assert(offsetof(struct klc_uring_req_header, ring_ent_in_out) == 256,
               "fuse_uring_req_header layout");
_Static_assert(sizeof(struct klc_uring_cmd_req) == 24, "fuse_uring_cmd_req");

#endif

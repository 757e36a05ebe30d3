/* A stand-in for NVIDIA's libnccl.so.2 for machines without GPUs (CI): the calls dinovmf's
 * `--features nccl` makes, for ranks whose "device" buffers are host memory (the CUDA
 * backend on the host simulator). Built by scripts/nccl-stub.sh; never ship it, never put it
 * on a GPU machine's library path (it would dereference device pointers).
 *
 * Ranks may be threads of one process or processes on one machine (one mpirun): a
 * communicator is a POSIX shared-memory segment named after the unique id, with one staging
 * slot per rank and a barrier made of two atomic counters. A collective moves the buffer in
 * chunks of SLOT_BYTES: every rank copies its chunk into its slot, waits for all, reads what it
 * needs, waits again. Sums (and maxima) are taken in rank order, ((x0 + x1) + x2) + ..., so
 * every rank gets the same bits (real NCCL's ring sum adds in another order; for two ranks
 * a + b == b + a; a maximum is exact in any order).
 * The stream argument is ignored: the simulator's launches are synchronous. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    char internal[128];
} ncclUniqueId;

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
} ncclResult_t;

/* The values of nccl.h: ncclFloat32 is 7, ncclSum is 0, ncclMax is 2. */
#define STUB_FLOAT32 7
#define STUB_SUM 0
#define STUB_MAX 2
#define SLOT_BYTES (1 << 20)
#define MAGIC "dinovmf-nccl-stub"

struct header {
    atomic_int arrived;
    atomic_uint generation;
};

struct ncclComm {
    struct header *h;
    unsigned char *slots;
    size_t map_bytes;
    int rank, nranks;
};
typedef struct ncclComm *ncclComm_t;

static const size_t HEADER_BYTES = 4096;

const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "system error (dinovmf NCCL stub: shared memory)";
    case ncclInternalError: return "internal error (dinovmf NCCL stub)";
    case ncclInvalidArgument:
        return "invalid argument (dinovmf NCCL stub: only float32 sums, maxima and gathers)";
    case ncclInvalidUsage: return "invalid usage (dinovmf NCCL stub)";
    default: return "unknown result (dinovmf NCCL stub)";
    }
}

ncclResult_t ncclGetVersion(int *version) {
    if (!version) return ncclInvalidArgument;
    *version = 0; /* not a real NCCL */
    return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static atomic_uint counter;
    struct timespec t;
    if (!id) return ncclInvalidArgument;
    clock_gettime(CLOCK_REALTIME, &t);
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "%s-%d-%ld-%ld-%u", MAGIC, (int)getpid(),
             (long)t.tv_sec, (long)t.tv_nsec, atomic_fetch_add(&counter, 1));
    return ncclSuccess;
}

/* All ranks of the communicator wait here; reusable (sense by generation). */
static void barrier(ncclComm_t c) {
    struct header *h = c->h;
    unsigned gen = atomic_load(&h->generation);
    if (atomic_fetch_add(&h->arrived, 1) == c->nranks - 1) {
        atomic_store(&h->arrived, 0);
        atomic_fetch_add(&h->generation, 1);
        return;
    }
    for (unsigned spins = 0; atomic_load(&h->generation) == gen; spins++) {
        if (spins < 64) {
            sched_yield();
        } else {
            struct timespec nap = {0, 20000};
            nanosleep(&nap, NULL);
        }
    }
}

static void shm_name(const ncclUniqueId *id, char *out, size_t n) {
    /* The id's text without the characters a shm name may not hold. */
    size_t j = snprintf(out, n, "/");
    for (size_t i = 0; i < sizeof id->internal && id->internal[i] && j + 1 < n; i++) {
        char ch = id->internal[i];
        out[j++] = (ch == '/') ? '_' : ch;
    }
    out[j] = 0;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    char name[160];
    if (!comm || nranks < 1 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    if (strncmp(id.internal, MAGIC, strlen(MAGIC)) != 0) return ncclInvalidUsage;
    shm_name(&id, name, sizeof name);
    size_t bytes = HEADER_BYTES + (size_t)nranks * SLOT_BYTES;
    int fd = shm_open(name, O_RDWR | O_CREAT, 0600);
    if (fd < 0) return ncclSystemError;
    /* Every rank sets the same size; a fresh segment reads as zeros (counters at 0). */
    if (ftruncate(fd, (off_t)bytes) != 0) {
        close(fd);
        return ncclSystemError;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return ncclSystemError;
    struct ncclComm *c = calloc(1, sizeof *c);
    if (!c) {
        munmap(p, bytes);
        return ncclSystemError;
    }
    c->h = p;
    c->slots = (unsigned char *)p + HEADER_BYTES;
    c->map_bytes = bytes;
    c->rank = rank;
    c->nranks = nranks;
    barrier(c);
    /* Everyone has the segment mapped: its name is no longer needed. */
    if (rank == 0) shm_unlink(name);
    *comm = c;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    munmap(comm->h, comm->map_bytes);
    free(comm);
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, int datatype,
                           int op, ncclComm_t comm, void *stream) {
    (void)stream;
    if (!comm || datatype != STUB_FLOAT32 || (op != STUB_SUM && op != STUB_MAX))
        return ncclInvalidArgument;
    if (count && (!sendbuff || !recvbuff)) return ncclInvalidArgument;
    const size_t per = SLOT_BYTES / sizeof(float);
    const float *src = sendbuff;
    float *dst = recvbuff;
    for (size_t off = 0; off < count; off += per) {
        size_t n = count - off < per ? count - off : per;
        float *mine = (float *)(comm->slots + (size_t)comm->rank * SLOT_BYTES);
        memcpy(mine, src + off, n * sizeof(float));
        barrier(comm);
        for (size_t i = 0; i < n; i++) {
            float s = ((const float *)comm->slots)[i];
            for (int r = 1; r < comm->nranks; r++) {
                float x = ((const float *)(comm->slots + (size_t)r * SLOT_BYTES))[i];
                if (op == STUB_SUM)
                    s += x;
                else if (x > s)
                    s = x;
            }
            dst[off + i] = s;
        }
        barrier(comm);
    }
    return ncclSuccess;
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, int datatype,
                           ncclComm_t comm, void *stream) {
    (void)stream;
    if (!comm || datatype != STUB_FLOAT32) return ncclInvalidArgument;
    if (sendcount && (!sendbuff || !recvbuff)) return ncclInvalidArgument;
    const size_t per = SLOT_BYTES / sizeof(float);
    const float *src = sendbuff;
    float *dst = recvbuff;
    for (size_t off = 0; off < sendcount; off += per) {
        size_t n = sendcount - off < per ? sendcount - off : per;
        memcpy(comm->slots + (size_t)comm->rank * SLOT_BYTES, src + off, n * sizeof(float));
        barrier(comm);
        for (int r = 0; r < comm->nranks; r++)
            memcpy(dst + (size_t)r * sendcount + off, comm->slots + (size_t)r * SLOT_BYTES,
                   n * sizeof(float));
        barrier(comm);
    }
    return ncclSuccess;
}

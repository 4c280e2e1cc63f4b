/* blit_frame_small: read a batch of small files of one directory and write them as data-stream
 * frames (blit.transport.protocol.FRAME: DATA header, payload, END header; an empty file is its
 * END alone), in one call, for a remote transfer's sender (blit.transport.data.send_loop).
 *
 * Per file: open (the caller's flags: O_NOFOLLOW, O_NONBLOCK...), fstat, pread size + 1 bytes,
 * close. A file that is not small and plain (larger than `max`, or sparse as fsops.is_sparse
 * says) is left to the caller's own path; one that is not regular, fails, or holds another
 * number of bytes than fstat said is reported with its reason.
 *
 * It must not decide anything about the transfer (which files, ids, what a failure means), nor
 * write anything but `out`, `status` and `counts`. Concatenated after _scan.c by _build_scan.py
 * (one translation unit); cffi releases the GIL around the call.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLIT_FR_SIZE 24        /* protocol.FRAME: !BBHIQQ */
#define BLIT_FR_DATA 1         /* protocol.FrameType.DATA */
#define BLIT_FR_END 2          /* protocol.FrameType.END */
#define BLIT_FR_FRAMED 0       /* status: the file's frames are in `out` */
#define BLIT_FR_CALLER 1       /* status: not a small plain file: the caller sends it its own way */
#define BLIT_FR_CHANGED 2      /* status: it did not hold the bytes fstat announced */
#define BLIT_FR_NOT_REGULAR 3  /* status: not a regular file (something else took the name) */

static void fr_put(char *p, int kind, int64_t id, int64_t offset, int64_t length) {
    uint64_t o = (uint64_t)offset, l = (uint64_t)length;
    uint32_t i = (uint32_t)id;
    p[0] = (char)kind;
    p[1] = p[2] = p[3] = 0;
    for (int k = 0; k < 4; k++)
        p[4 + k] = (char)(i >> (24 - 8 * k));
    for (int k = 0; k < 8; k++) {
        p[8 + k] = (char)(o >> (56 - 8 * k));
        p[16 + k] = (char)(l >> (56 - 8 * k));
    }
}

/* Files `n` of directory `dfd`: their names one after another in `names`, each NUL-terminated;
 * frame ids ids[i]. status[i] receives BLIT_FR_FRAMED, BLIT_FR_CALLER, BLIT_FR_CHANGED,
 * BLIT_FR_NOT_REGULAR or -errno. Frames go to `out` (cap bytes); counts[0] receives their
 * length, counts[1] the payload bytes, counts[2] the frames, counts[3] the bytes of `names`
 * of the files done. Stops before a file whose frames might not fit (a file read is at most
 * max + 1 bytes); returns the number of files done (the caller calls again with the rest). */
static int blit_frame_small(int dfd, int n, const char *names, const int64_t *ids, int oflags,
                            int64_t max, char *out, int64_t cap, int64_t *status, int64_t *counts) {
    int64_t pos = 0, payload = 0, frames = 0;
    const char *next = names;
    int i;
    for (i = 0; i < n; i++) {
        if (cap - pos < max + 1 + 2 * BLIT_FR_SIZE)
            break;
        const char *name = next;
        next += strlen(name) + 1;
        int fd = openat(dfd, name, oflags);
        if (fd < 0) {
            status[i] = -errno;
            continue;
        }
        struct stat st;
        if (fstat(fd, &st) != 0) {
            status[i] = -errno;
            close(fd);
            continue;
        }
        if (!S_ISREG(st.st_mode)) {
            status[i] = BLIT_FR_NOT_REGULAR;
            close(fd);
            continue;
        }
        int64_t size = st.st_size;
        if (size > max || (size > 65536 && st.st_blocks * 512 < size - 65536)) {
            status[i] = BLIT_FR_CALLER;
            close(fd);
            continue;
        }
        char *data = out + pos + BLIT_FR_SIZE;
        int64_t got = 0;
        int err = 0;
        while (got <= size) {  /* one byte more than announced: a file that grew is noticed */
            size_t want = (size_t)(size + 1 - got);
            ssize_t r = pread(fd, data + got, want, got);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                err = -errno;
                break;
            }
            if (r == 0)
                break;
            got += r;
            if (got == size && (size_t)r < want)
                break;  /* short of the extra byte: the end of a regular file, no second read */
        }
        close(fd);
        if (err) {
            status[i] = err;
            continue;
        }
        if (got != size) {
            status[i] = BLIT_FR_CHANGED;
            continue;
        }
        if (size) {
            fr_put(out + pos, BLIT_FR_DATA, ids[i], 0, size);
            pos += BLIT_FR_SIZE + size;
            frames++;
        }
        fr_put(out + pos, BLIT_FR_END, ids[i], size, 0);
        pos += BLIT_FR_SIZE;
        frames++;
        payload += size;
        status[i] = BLIT_FR_FRAMED;
    }
    counts[0] = pos;
    counts[1] = payload;
    counts[2] = frames;
    counts[3] = next - names;
    return i;
}

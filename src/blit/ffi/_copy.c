/* blit_copy_new: copy a batch of small new regular files from one directory to another in a
 * single call, landing each exactly as blit.fsops.copy_small + Landing do.
 *
 * Per file: open the source (O_NOFOLLOW), flistxattr (a file with any xattr goes back to
 * Python, which copies them), create the destination unnamed (O_TMPFILE in the destination
 * directory; a named ".blit-<16 hex>.tmp" where the filesystem lacks it), read and write the
 * data, fchown as root, fchmod when needed, futimens last, then link it under its real name
 * (linkat AT_EMPTY_PATH, else through /proc/self/fd/N) or rename the named temporary. cffi
 * releases the GIL around the call, so worker threads copy in parallel.
 *
 * It must not replace an existing entry, leave a partial file under a real name, or leave a
 * temporary behind: any failure for a file removes what was made for it and reports -errno for
 * that file. Concatenated after _scan.c by _build_scan.py (one translation unit).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLIT_CC_FIELDS 7        /* per file in `in`: name_off, mode, size, atime_ns, mtime_ns, uid, gid */
#define BLIT_CC_PYTHON (-100000) /* this file goes back to the Python path (xattrs, a name race) */
#define BLIT_CC_NOT_DONE (-100001) /* not attempted: the batch stopped at a fatal error */
#define BLIT_CC_ROOT 1           /* we are root: set owner/group */
#define BLIT_CC_INHERIT_GID 2    /* the directory may give new files another group: always chown */

#ifndef O_TMPFILE
#define O_TMPFILE 0
#endif

/* fsops._tmpfile_ok: 1 O_TMPFILE works (or not tried yet), -1 it does not here. */
static int cc_tmpfile = 1;
/* ffi.linux._link_method: 0 not decided, 1 linkat AT_EMPTY_PATH, 2 /proc/self/fd. */
static int cc_link = 0;

static int cc_link_fd(int fd, int dfd, const char *name) {
    if (cc_link != 2) {
        if (linkat(fd, "", dfd, name, AT_EMPTY_PATH) == 0) {
            cc_link = 1;
            return 0;
        }
        if (errno != ENOENT)
            return -errno;
    }
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    if (linkat(AT_FDCWD, p, dfd, name, AT_SYMLINK_FOLLOW) != 0)
        return -errno;
    if (cc_link == 0)
        cc_link = 2;
    return 0;
}

/* fsops.new_tmp_name: ".blit-" + 16 hex digits + ".tmp" (26 bytes). */
static int cc_tmp_name(char out[32]) {
    unsigned char r[8];
    ssize_t got = getrandom(r, sizeof r, 0);
    if (got != (ssize_t)sizeof r)
        return got < 0 ? -errno : -EIO;
    static const char hex[] = "0123456789abcdef";
    memcpy(out, ".blit-", 6);
    for (int i = 0; i < 8; i++) {
        out[6 + 2 * i] = hex[r[i] >> 4];
        out[7 + 2 * i] = hex[r[i] & 15];
    }
    memcpy(out + 22, ".tmp", 5);
    return 0;
}

static int cc_write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fsops.read_all + write_all: read size+1 bytes; exactly `size` means done, anything else
 * (the file shrank or grew) is read to EOF. Returns bytes copied or -errno. */
static int64_t cc_copy_data(int in, int out, int64_t size, char *buf, int64_t cap) {
    int64_t done = 0;
    int first = 1;
    for (;;) {
        int64_t want = first && size + 1 <= cap ? size + 1 : cap;
        ssize_t n = read(in, buf, (size_t)want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return done;
        int w = cc_write_all(out, buf, (size_t)n);
        if (w < 0)
            return w;
        done += n;
        if (first && n == size && want == size + 1)
            return done;
        first = 0;
    }
}

/* One file. Returns bytes copied, BLIT_CC_PYTHON, or -errno (nothing left at the destination). */
static int64_t cc_one(int sfd, int dfd, const char *name, const int64_t *f, int flags, int umask_bits,
                      uid_t euid, gid_t egid, char *buf, int64_t cap) {
    int64_t mode = f[1], size = f[2];
    int in = openat(sfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
    if (in < 0)
        return -errno;
    int64_t ret;
    ssize_t nx = flistxattr(in, NULL, 0);
    if (nx > 0) {
        close(in);
        return BLIT_CC_PYTHON;
    }
    if (nx < 0 && errno != ENOTSUP && errno != EOPNOTSUPP && errno != EPERM && errno != EACCES) {
        ret = -errno;
        close(in);
        return ret;
    }
    /* Landing.__init__: the final permission bits when the umask lets them through, else 0600. */
    int create = (int)(mode & 0777) | 0600;
    int lmode = (create & umask_bits) ? 0600 : create;
    char tmp[32];
    int named = 0;
    int out = -1;
    if (O_TMPFILE && cc_tmpfile > 0) {
        out = openat(dfd, ".", O_WRONLY | O_TMPFILE | O_CLOEXEC, lmode);
        if (out < 0) {
            int e = errno;
            if (e != EOPNOTSUPP && e != EISDIR && e != EINVAL && e != ENOENT) {
                close(in);
                return -e;
            }
            cc_tmpfile = -1;
        }
    }
    if (out < 0) {
        int r = cc_tmp_name(tmp);
        if (r < 0) {
            close(in);
            return r;
        }
        out = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, lmode);
        if (out < 0) {
            ret = -errno;
            close(in);
            return ret;
        }
        named = 1;
    }
    int64_t copied = 0;
    if (size) {
        copied = cc_copy_data(in, out, size, buf, cap);
        if (copied < 0) {
            ret = copied;
            goto fail;
        }
    }
    /* Landing.finish_meta with no xattrs. */
    int chowned = 0;
    if ((flags & BLIT_CC_ROOT) &&
        ((flags & BLIT_CC_INHERIT_GID) || (uid_t)f[5] != euid || (gid_t)f[6] != egid)) {
        if (fchown(out, (uid_t)f[5], (gid_t)f[6]) != 0) {
            ret = -errno;
            goto fail;
        }
        chowned = 1;
    }
    int fmode = (int)(mode & 07777);
    if ((fmode != lmode || chowned) && fchmod(out, (mode_t)fmode) != 0) {
        ret = -errno;
        goto fail;
    }
    struct timespec ts[2];
    ts[0].tv_sec = (time_t)(f[3] / 1000000000);
    ts[0].tv_nsec = (long)(f[3] % 1000000000);
    ts[1].tv_sec = (time_t)(f[4] / 1000000000);
    ts[1].tv_nsec = (long)(f[4] % 1000000000);
    for (int i = 0; i < 2; i++)
        if (ts[i].tv_nsec < 0) { /* before 1970: floor division, as Python's divmod */
            ts[i].tv_sec -= 1;
            ts[i].tv_nsec += 1000000000;
        }
    if (futimens(out, ts) != 0) {
        ret = -errno;
        goto fail;
    }
    /* Landing.commit(name, replace=False). */
    if (named) {
        if (renameat(dfd, tmp, dfd, name) != 0) {
            ret = -errno;
            goto fail;
        }
        named = 0;
    } else {
        int r = cc_link_fd(out, dfd, name);
        if (r < 0) {
            /* A name that appeared meanwhile: Python's commit replaces it through a temporary. */
            ret = r == -EEXIST ? BLIT_CC_PYTHON : r;
            goto fail;
        }
    }
    close(in);
    if (close(out) != 0)
        return -errno;
    return copied;
fail:
    close(out);
    if (named)
        unlinkat(dfd, tmp, 0);
    close(in);
    return ret;
}

/* Copy `n` new files from directory `sfd` to `dfd` (same names). `in` holds BLIT_CC_FIELDS
 * int64 per file; names are NUL-terminated at names + name_off. `out[i]` receives the bytes
 * copied, -errno, BLIT_CC_PYTHON or BLIT_CC_NOT_DONE. `buf` (cap bytes) is the data buffer.
 * A destination that is full or read-only (ENOSPC, EDQUOT, EROFS: worker.FATAL_ERRNOS) stops
 * the batch. Returns the number of files attempted. */
static int blit_copy_new(int sfd, int dfd, int n, const int64_t *in, const char *names, int64_t *out,
                         int flags, int umask_bits, char *buf, int64_t cap) {
    uid_t euid = geteuid();
    gid_t egid = getegid();
    int i;
    for (i = 0; i < n; i++) {
        const int64_t *f = in + (int64_t)i * BLIT_CC_FIELDS;
        int64_t r = cc_one(sfd, dfd, names + f[0], f, flags, umask_bits, euid, egid, buf, cap);
        out[i] = r;
        if (r == -ENOSPC || r == -EDQUOT || r == -EROFS) {
            i++;
            break;
        }
    }
    for (int j = i; j < n; j++)
        out[j] = BLIT_CC_NOT_DONE;
    return i;
}

/* Tests: force the named-temporary fallback (-1) or the /proc/self/fd link (2); 1/0 restore. */
static void blit_set_copy_modes(int tmpfile, int link) {
    cc_tmpfile = tmpfile;
    cc_link = link;
}

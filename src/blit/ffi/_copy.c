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
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLIT_CC_FIELDS 7        /* per file in `in`: name_off, mode, size, atime_ns, mtime_ns, uid, gid */
#define BLIT_CC_PYTHON (-100000) /* this file goes back to the Python path (xattrs, a name race) */
#define BLIT_CC_NOT_DONE (-100001) /* not attempted: the batch stopped at a fatal error */
#define BLIT_CC_ROOT 1           /* we are root: set owner/group */
#define BLIT_CC_INHERIT_GID 2    /* the directory may give new files another group: always chown */
#define BLIT_CC_REPLACE 4        /* an entry of that name may exist: link under a temporary name, rename over it */
#define BLIT_CC_BACK 8           /* cc_one: a name that appeared meanwhile goes back to Python */
#define BLIT_CC_DIRECT 16        /* cc_land: the directory is hidden (DestTree, R41): create under the real name */

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
 * (the file shrank or grew) is read to EOF. Returns bytes copied or -errno; cc_one sends a
 * file that came up short back to Python, which refuses it (fsops.CHANGED_SIZE). */
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

/* Landing.__init__: create the destination file unnamed (O_TMPFILE in `dfd`) or, where the
 * filesystem lacks it, under a new temporary name written to `tmp` (*named = 1). Returns the fd
 * or -errno. `lmode` is the mode it is created with. */
static int cc_create(int dfd, int lmode, char tmp[32], int *named) {
    *named = 0;
    if (O_TMPFILE && cc_tmpfile > 0) {
        int out = openat(dfd, ".", O_WRONLY | O_TMPFILE | O_CLOEXEC, lmode);
        if (out >= 0)
            return out;
        int e = errno;
        if (e != EOPNOTSUPP && e != EISDIR && e != EINVAL && e != ENOENT)
            return -e;
        cc_tmpfile = -1;
    }
    int r = cc_tmp_name(tmp);
    if (r < 0)
        return r;
    int out = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, lmode);
    if (out < 0)
        return -errno;
    flock(out, LOCK_SH); /* fsops.hold_tmp: another run's scan leaves a live temporary alone */
    *named = 1;
    return out;
}

/* Landing.__init__'s creation mode: the final permission bits when the umask lets them
 * through, else 0600. */
static int cc_lmode(int64_t mode, int umask_bits) {
    int create = (int)(mode & 0777) | 0600;
    return (create & umask_bits) ? 0600 : create;
}

/* Landing.finish_meta with no xattrs, then Landing.commit: `f` holds mode, atime_ns, mtime_ns,
 * uid, gid at f[1], f[3], f[4], f[5], f[6] (BLIT_CC_FIELDS order). An entry `name` is
 * replaced (as Landing.commit does), or with BLIT_CC_BACK the answer is BLIT_CC_PYTHON. Returns
 * 0, -errno or BLIT_CC_PYTHON; *named is cleared once no temporary name is left. */
static int cc_meta(int out, const int64_t *f, int lmode, int flags, uid_t euid, gid_t egid) {
    int chowned = 0;
    if ((flags & BLIT_CC_ROOT) &&
        ((flags & BLIT_CC_INHERIT_GID) || (uid_t)f[5] != euid || (gid_t)f[6] != egid)) {
        if (fchown(out, (uid_t)f[5], (gid_t)f[6]) != 0)
            return -errno;
        chowned = 1;
    }
    int fmode = (int)(f[1] & 07777);
    if ((fmode != lmode || chowned) && fchmod(out, (mode_t)fmode) != 0)
        return -errno;
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
    if (futimens(out, ts) != 0)
        return -errno;
    return 0;
}

static int cc_meta_link(int out, int dfd, const char *name, const int64_t *f, int lmode, int flags,
                        uid_t euid, gid_t egid, char tmp[32], int *named) {
    int r0 = cc_meta(out, f, lmode, flags, euid, egid);
    if (r0 < 0)
        return r0;
    if (!*named) {
        int r;
        if (!(flags & BLIT_CC_REPLACE)) {
            r = cc_link_fd(out, dfd, name);
            if (r == 0)
                return 0;
            if (r != -EEXIST)
                return r;
            if (flags & BLIT_CC_BACK)
                return BLIT_CC_PYTHON; /* a name that appeared meanwhile: Python's commit replaces it */
        }
        /* Landing.commit over an entry: a temporary name first, then rename over it. */
        r = cc_tmp_name(tmp);
        if (r < 0)
            return r;
        flock(out, LOCK_SH); /* fsops.hold_tmp */
        r = cc_link_fd(out, dfd, tmp);
        if (r < 0)
            return r;
        *named = 1;
    }
    if (renameat(dfd, tmp, dfd, name) != 0)
        return -errno;
    *named = 0;
    return 0;
}

/* cc_meta_link, taking `out`: it is closed either way, and on failure the temporary name (if
 * any) is removed, so nothing is left behind. Returns 0, -errno or BLIT_CC_PYTHON. */
static int cc_finish(int out, int dfd, const char *name, const int64_t *f, int lmode, int flags,
                     uid_t euid, gid_t egid, char tmp[32], int named) {
    int r = cc_meta_link(out, dfd, name, f, lmode, flags, euid, egid, tmp, &named);
    if (r < 0) {
        close(out);
        if (named)
            unlinkat(dfd, tmp, 0);
        return r;
    }
    return close(out) != 0 ? -errno : 0;
}

/* One file. Returns bytes copied, BLIT_CC_PYTHON, or -errno (nothing left at the destination). */
static int64_t cc_one(int sfd, int dfd, const char *name, const int64_t *f, int flags, int umask_bits,
                      uid_t euid, gid_t egid, char *buf, int64_t cap) {
    int64_t size = f[2];
    /* O_NONBLOCK: a FIFO put in the file's place since the scan must not block the open. */
    int in = openat(sfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    if (in < 0)
        return -errno;
    struct stat ist;
    if (fstat(in, &ist) != 0) {
        int e = errno;
        close(in);
        return -e;
    }
    if (!S_ISREG(ist.st_mode)) { /* something else took the name: Python's path reports it */
        close(in);
        return S_ISDIR(ist.st_mode) ? -EISDIR : BLIT_CC_PYTHON;
    }
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
    int lmode = cc_lmode(f[1], umask_bits);
    char tmp[32];
    int named;
    int out = cc_create(dfd, lmode, tmp, &named);
    if (out < 0) {
        close(in);
        return out;
    }
    int64_t copied = 0;
    if (size) {
        copied = cc_copy_data(in, out, size, buf, cap);
        if (copied < 0 || copied < size) { /* shorter than listed: Python says so */
            ret = copied < 0 ? copied : BLIT_CC_PYTHON;
            goto fail;
        }
    }
    /* A name that appeared meanwhile comes back as BLIT_CC_PYTHON. */
    ret = cc_finish(out, dfd, name, f, lmode, (flags & ~BLIT_CC_REPLACE) | BLIT_CC_BACK, euid, egid, tmp, named);
    close(in);
    return ret < 0 ? ret : copied;
fail:
    close(out);
    if (named)
        unlinkat(dfd, tmp, 0);
    close(in);
    return ret;
}

/* cc_land into a hidden directory (BLIT_CC_DIRECT): nobody sees it until the whole directory is
 * renamed into place (blit.transport.tree.DestTree), so the file is created under its real name
 * (O_EXCL: nothing of that name can be there) and needs no temporary and no link. On failure
 * the name is removed again. Returns 0 or -errno. */
static int cc_land_direct(int dfd, const char *name, const char *data, const int64_t *f, int flags,
                          int lmode, uid_t euid, gid_t egid) {
    int out = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, lmode);
    if (out < 0)
        return -errno;
    int r = f[2] ? cc_write_all(out, data, (size_t)f[2]) : 0;
    if (r == 0)
        r = cc_meta(out, f, lmode, flags, euid, egid);
    if (close(out) != 0 && r == 0)
        r = -errno;
    if (r < 0)
        unlinkat(dfd, name, 0);
    return r;
}

/* Move a hidden directory into place: renameat2 RENAME_NOREPLACE (an entry that took the name
 * meanwhile is never replaced: -EEXIST). Where the filesystem lacks it (-EINVAL), a check
 * for the name, then rename. Returns 0 or -errno. */
static int blit_rename_noreplace(int odfd, const char *old, int ndfd, const char *new_) {
#ifdef SYS_renameat2
    if (syscall(SYS_renameat2, odfd, old, ndfd, new_, 1 /* RENAME_NOREPLACE */) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -errno;
#endif
    struct stat st;
    if (fstatat(ndfd, new_, &st, AT_SYMLINK_NOFOLLOW) == 0)
        return -EEXIST;
    if (errno != ENOENT)
        return -errno;
    return renameat(odfd, old, ndfd, new_) == 0 ? 0 : -errno;
}

/* Land one small file whose whole content is in memory (a remote transfer's destination,
 * blit.transport.tree.DestTree.land_many), exactly as fsops.Landing does for a file without xattrs:
 * create, write `size` bytes of `data`, owner, mode, times, link (BLIT_CC_REPLACE: an entry of
 * that name exists; it is replaced through a temporary name and a rename either way). `f`
 * holds BLIT_CC_FIELDS values (name_off unused). Returns 0 or -errno (nothing left behind). */
static int cc_land(int dfd, const char *name, const char *data, const int64_t *f, int flags,
                   int umask_bits, uid_t euid, gid_t egid) {
    int64_t size = f[2];
    int lmode = cc_lmode(f[1], umask_bits);
    char tmp[32];
    int named;
    if (flags & BLIT_CC_DIRECT)
        return cc_land_direct(dfd, name, data, f, flags, lmode, euid, egid);
    int out = cc_create(dfd, lmode, tmp, &named);
    if (out < 0)
        return out;
    int r = size ? cc_write_all(out, data, (size_t)size) : 0;
    if (r == 0)
        return cc_finish(out, dfd, name, f, lmode, flags, euid, egid, tmp, named);
    close(out);
    if (named)
        unlinkat(dfd, tmp, 0);
    return r;
}

/* `n` small files of directory `dfd` in one call, each as cc_land: file i's fields are at
 * in + i * BLIT_CC_FIELDS (name_off unused: the names follow one another in `names`, each
 * NUL-terminated, in file order), its content at data + data_off[i], its flags in flags[i] |
 * `common`. out[i] receives 0 or -errno; every file is attempted. */
static void blit_land_many(int dfd, int n, const int64_t *in, const char *names, const char *data,
                           const int64_t *data_off, const int64_t *flags, int common, int64_t *out,
                           int umask_bits) {
    uid_t euid = geteuid();
    gid_t egid = getegid();
    const char *name = names;
    for (int i = 0; i < n; i++) {
        const int64_t *f = in + (int64_t)i * BLIT_CC_FIELDS;
        out[i] = cc_land(dfd, name, data + data_off[i], f, (int)flags[i] | common, umask_bits, euid, egid);
        name += strlen(name) + 1;
    }
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

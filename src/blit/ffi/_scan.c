/* blit_cmpdir: compare one source directory with its destination in a single call
 * (and blit_digest_dir, at the end: one directory's canonical listing for remote transfers).
 *
 * The hot path of a mirror or copy where most files are already up to date: for each source
 * entry, lstat both sides and, when it is a plain regular file whose size, mtime, mode (and
 * owner as root) match and neither side carries an xattr, count it as up to date without
 * returning it. Everything else (directories, symlinks, specials, hard links, changed or missing
 * files, files with xattrs) is returned to Python with both stat results, where the ordinary
 * planner handles it. cffi releases the GIL around the call, so threads run it in parallel.
 *
 * It must not change anything on disk, follow a symlink, or decide anything beyond "this file
 * is up to date": any surprise (an entry vanishing, an unexpected errno, a full buffer) makes it
 * return an error and the caller uses the pure-Python path for that directory.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLIT_SCAN_VERSION 18
#define BLIT_CHECK_OWNER 1
#define BLIT_CHECK_XATTRS 2
#define BLIT_KEEP_TMP 4 /* blit_scan_packed: temporaries go to `others` (a destination's scan) */
#define BLIT_REC_FIELDS 25

#ifndef SYS_listxattrat
#if defined(__x86_64__) || defined(__aarch64__) || defined(__i386__) || defined(__arm__)
#define SYS_listxattrat 465
#endif
#endif

static int blit_version(void) { return BLIT_SCAN_VERSION; }

/* Open directory `path` below `dfd` without following a symlink in any of its components and
 * without leaving `dfd` (openat2 RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH): a directory of a tree
 * swapped for a symlink while a run walks it is refused (-ELOOP), never followed. Returns the
 * fd, -errno, or -ENOSYS where the kernel lacks openat2 (the caller walks component by
 * component instead). */
struct blit_open_how {
    uint64_t flags, mode, resolve;
};

static int blit_open_dir_beneath(int dfd, const char *path) {
#ifdef SYS_openat2
    struct blit_open_how how = {O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW, 0, 0x04 | 0x08};
    long fd = syscall(SYS_openat2, dfd, path, &how, sizeof how);
    if (fd >= 0)
        return (int)fd;
    if (errno == EAGAIN || errno == EINTR) /* a rename elsewhere raced the lookup: once more */
        fd = syscall(SYS_openat2, dfd, path, &how, sizeof how);
    if (fd >= 0)
        return (int)fd;
    return -errno;
#else
    (void)dfd;
    (void)path;
    return -ENOSYS;
#endif
}


/* 1: listxattrat works, 0: not tried yet, -1: not available (use the thread's own cwd). */
static int have_listxattrat = 0;
static __thread int thread_fs_private = 0;

static void probe_listxattrat(void) {
#ifdef SYS_listxattrat
    if (syscall(SYS_listxattrat, AT_FDCWD, "/", 0, NULL, (size_t)0) >= 0 || errno != ENOSYS) {
        have_listxattrat = 1;
        return;
    }
#endif
    have_listxattrat = -1;
}

/* Where a scan has moved the thread's cwd (fallback path only), and where it was before. */
struct cwd_state {
    int at;    /* the directory fd the cwd points at now, or -1 */
    int saved; /* an O_PATH fd of the cwd before the first move, or -1 */
};

#define CWD_STATE_INIT {-1, -1}

/* Put the cwd back where it was and drop the saved fd; returns `ret`, or -errno when the cwd
 * could not be restored and `ret` was not already an error. */
static int cwd_restore(struct cwd_state *c, int ret) {
    if (c->saved >= 0) {
        if (fchdir(c->saved) != 0 && ret >= 0)
            ret = -errno;
        close(c->saved);
        c->saved = -1;
    }
    return ret;
}

/* Does the entry carry any xattr? 0 no, 1 yes, -errno on failure. Without listxattrat, the
 * thread's cwd (made private by unshare CLONE_FS) is moved to `dfd`, saved first in `c`; the
 * caller calls cwd_restore before returning to Python. */
static int has_xattrs(int dfd, const char *name, struct cwd_state *c) {
    ssize_t n;
#ifdef SYS_listxattrat
    if (have_listxattrat > 0) {
        n = syscall(SYS_listxattrat, dfd, name, AT_SYMLINK_NOFOLLOW, NULL, (size_t)0);
        if (n >= 0)
            return n > 0;
        return (errno == ENOTSUP || errno == EOPNOTSUPP) ? 0 : -errno;
    }
#endif
    if (!thread_fs_private) {
        if (unshare(CLONE_FS) != 0)
            return -errno;
        thread_fs_private = 1;
    }
    if (c->saved < 0) {
        c->saved = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (c->saved < 0)
            return -errno;
    }
    if (c->at != dfd) {
        if (fchdir(dfd) != 0)
            return -errno;
        c->at = dfd;
    }
    n = llistxattr(name, NULL, 0);
    if (n >= 0)
        return n > 0;
    return (errno == ENOTSUP || errno == EOPNOTSUPP) ? 0 : -errno;
}

static void put_stat(int64_t *r, const struct stat *st);
static int is_tmp_name(const char *n, size_t len);

/* Append `name` to `names` and write [name_off, name_len, stat x11] at `r`; -ENOBUFS when the
 * names buffer is full. */
static int put_named(int64_t *r, char *names, int64_t names_cap, int64_t *name_used, const char *name,
                     size_t len, const struct stat *st) {
    if (*name_used + (int64_t)len > names_cap)
        return -ENOBUFS;
    memcpy(names + *name_used, name, len);
    r[0] = *name_used;
    r[1] = (int64_t)len;
    *name_used += (int64_t)len;
    put_stat(r + 2, st);
    return 0;
}

/* Whether an entry's times fit blit's int64 nanoseconds (the years 1677-2262): one that does
 * not is left to the Python scan, which reports it (fsops.scan), rather than wrapped here. */
static int times_fit(const struct stat *st) {
    const time_t lim = 9223372035; /* INT64_MAX / 1e9, less a second for the nanoseconds */
    return st->st_mtim.tv_sec <= lim && st->st_mtim.tv_sec >= -lim && st->st_atim.tv_sec <= lim &&
           st->st_atim.tv_sec >= -lim;
}

static void put_stat(int64_t *r, const struct stat *st) {
    r[0] = st->st_mode;
    r[1] = st->st_size;
    r[2] = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    r[3] = (int64_t)st->st_atim.tv_sec * 1000000000 + st->st_atim.tv_nsec;
    r[4] = st->st_uid;
    r[5] = st->st_gid;
    r[6] = (int64_t)st->st_ino;
    r[7] = (int64_t)st->st_dev;
    r[8] = st->st_nlink;
    r[9] = (int64_t)st->st_rdev;
    r[10] = st->st_blocks;
}

static int is_dot(const char *n) {
    return n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0));
}

/* The next entry's name of `d`, skipping . and ..; NULL at the end, with *ret = -errno when
 * reading failed (else *ret untouched). */
static const char *next_name(DIR *d, int *ret) {
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e) {
            if (errno)
                *ret = -errno;
            return NULL;
        }
        if (!is_dot(e->d_name))
            return e->d_name;
    }
}

/* A directory stream of its own over `dfd` (the caller's fd and its offset stay untouched);
 * NULL with *err = errno on failure. */
static DIR *open_stream(int dfd, int *err) {
    int fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        *err = errno;
        close(fd);
    }
    return d;
}

/* Count a directory's entries (without . and ..); -errno on failure. */
static int64_t count_entries(int dfd) {
    int oerr = 0;
    DIR *d = open_stream(dfd, &oerr);
    if (!d)
        return -oerr;
    int64_t n = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL)
        if (!is_dot(e->d_name))
            n++;
    int err = errno;
    closedir(d);
    return err ? -err : n;
}

/* Compare the directory `sfd` with `dfd`.
 *
 * Records (BLIT_REC_FIELDS int64 each) go to `rec` for every entry that is not a clean
 * up-to-date file: [name_off, name_len, src stat x11, dst_present, dst stat x11]; the names go
 * to `names` (not NUL-terminated). counts[0] = clean files, counts[1] = source entries,
 * counts[2] = destination entries, counts[3] = source names present at the destination (so the
 * destination holds other names, extras or temporaries, iff counts[2] > counts[3]).
 *
 * Returns the number of records, or -errno: -ENOBUFS when a buffer is too small, -EAGAIN when a
 * source entry vanished or changed kind under us, anything else from the system.
 */
static int blit_cmpdir(int sfd, int dfd, int flags, int64_t *rec, int rec_cap, char *names,
                       int64_t names_cap, int64_t *counts) {
    if (have_listxattrat == 0 && (flags & BLIT_CHECK_XATTRS))
        probe_listxattrat();
    int oerr = 0;
    DIR *d = open_stream(sfd, &oerr);
    if (!d)
        return -oerr;
    int nrec = 0, ret = 0;
    struct cwd_state cwd = CWD_STATE_INIT;
    int64_t clean = 0, total = 0, found = 0, name_used = 0;
    struct stat s, t;
    const char *name;
    while ((name = next_name(d, &ret)) != NULL) {
        size_t len = strlen(name);
        if (is_tmp_name(name, len))
            continue; /* a run's temporary is never a source entry (fsops.scan) */
        total++;
        if (fstatat(sfd, name, &s, AT_SYMLINK_NOFOLLOW) != 0) {
            ret = errno == ENOENT ? -EAGAIN : -errno;
            break;
        }
        int present = 1;
        if (fstatat(dfd, name, &t, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno != ENOENT) {
                ret = -errno;
                break;
            }
            present = 0;
        } else {
            found++;
        }
        if (!times_fit(&s) || (present && !times_fit(&t))) {
            ret = -EOVERFLOW;
            break;
        }
        if (present && S_ISREG(s.st_mode) && S_ISREG(t.st_mode) && s.st_nlink == 1 &&
            s.st_size == t.st_size && s.st_mtim.tv_sec == t.st_mtim.tv_sec &&
            s.st_mtim.tv_nsec == t.st_mtim.tv_nsec &&
            (s.st_mode & 07777) == (t.st_mode & 07777) &&
            (!(flags & BLIT_CHECK_OWNER) || (s.st_uid == t.st_uid && s.st_gid == t.st_gid))) {
            int dirty = 0;
            if (flags & BLIT_CHECK_XATTRS) {
                int a = has_xattrs(sfd, name, &cwd);
                int b = a == 0 ? has_xattrs(dfd, name, &cwd) : 0;
                if (a < 0 || b < 0) {
                    ret = a < 0 ? a : b;
                    break;
                }
                dirty = a || b;
            }
            if (!dirty) {
                clean++;
                continue;
            }
        }
        int64_t *r = rec + (int64_t)nrec * BLIT_REC_FIELDS;
        if (nrec >= rec_cap || put_named(r, names, names_cap, &name_used, name, len, &s) < 0) {
            ret = -ENOBUFS;
            break;
        }
        r[13] = present;
        if (present)
            put_stat(r + 14, &t);
        else
            memset(r + 14, 0, 11 * sizeof(int64_t));
        nrec++;
    }
    closedir(d);
    ret = cwd_restore(&cwd, ret);
    if (ret < 0)
        return ret;
    int64_t dn = count_entries(dfd);
    if (dn < 0)
        return (int)dn;
    counts[0] = clean;
    counts[1] = total;
    counts[2] = dn;
    counts[3] = found;
    return nrec;
}

/* Tests: 1 = use listxattrat, -1 = use the private-cwd fallback, 0 = probe again. */
static void blit_set_xattr_mode(int mode) { have_listxattrat = mode; }

/* blit_xattr_flags: whether each of `n` entries of directory `dfd` (`names`, each followed by
 * a NUL) carries an xattr: out[i] = 0 none (or the filesystem keeps none), 1 some, 2 unknown (a
 * failure, the entry vanished: the caller's per-entry path decides and reports). One call per
 * directory for the destination's up-to-date files (decisions R72). Returns 0, or -errno when
 * the thread's cwd could not be put back. It must not change anything on disk or follow a
 * symlink. */
static int blit_xattr_flags(int dfd, const char *names, int64_t n, unsigned char *out) {
    if (have_listxattrat == 0)
        probe_listxattrat();
    struct cwd_state cwd = CWD_STATE_INIT;
    const char *p = names;
    for (int64_t i = 0; i < n; i++) {
        int x = has_xattrs(dfd, p, &cwd);
        out[i] = x < 0 ? 2 : (unsigned char)x;
        p += strlen(p) + 1;
    }
    return cwd_restore(&cwd, 0);
}

/* blit_digest_dir: one directory's canonical record stream, for the remote digest shortcut
 * (docs/decisions.md R18). Both sides of a transfer run it on their directory and compare a hash
 * of the bytes: equal means every entry matches in everything the destination's planner and
 * finaliser compare, and neither side holds a name the other lacks.
 *
 * Records, sorted by name bytes, little-endian: u16 name_len, name, u8 kind ('f' 'd' 'l' 'p'),
 * u32 mode & 07777, u64 size (regular files, else 0), i64 mtime_ns, u32 uid, u32 gid (0 unless
 * BLIT_DIGEST_OWNER), u16 target_len, target (symlinks). Subdirectories also go to `sub`
 * ([name_off, name_len, stat x11] each, names in `names`, in name order).
 *
 * counts[0] = bytes used in `out`, counts[1] = entries, counts[2] = why the directory cannot
 * take the shortcut (0: it can; BLIT_DD_* bits; the scan stops at the first), counts[3] =
 * entries that are not directories. Returns the number of subdirectories, or -errno (-ENOBUFS
 * for a full buffer, -EAGAIN when an entry vanished). It must not change anything on disk or
 * follow a symlink.
 */
#define BLIT_DIGEST_OWNER 1
#define BLIT_DD_XATTRS 1
#define BLIT_DD_HARDLINK 2
#define BLIT_DD_TMP 4
#define BLIT_DD_KIND 8
#define BLIT_SUB_FIELDS 13

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int is_tmp_name(const char *n, size_t len) {
    /* fsops.is_tmp_name: ".blit-" + 16 hex + ".tmp" */
    return len == 26 && memcmp(n, ".blit-", 6) == 0 && memcmp(n + 22, ".tmp", 4) == 0;
}

static char *put_le(char *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++)
        p[i] = (char)((v >> (8 * i)) & 0xff);
    return p + n;
}

static int blit_digest_dir(int dfd, int flags, char *out, int64_t out_cap, int64_t *sub, int sub_cap,
                           char *names, int64_t names_cap, int64_t *counts) {
    if (have_listxattrat == 0)
        probe_listxattrat();
    int oerr = 0;
    DIR *d = open_stream(dfd, &oerr);
    if (!d)
        return -oerr;
    /* Collect the names (one malloc'd block, pointers fixed up after) and sort them. */
    size_t buf_cap = 1 << 16, buf_used = 0, n = 0, ptr_cap = 256;
    char *buf = malloc(buf_cap);
    size_t *offs = malloc(ptr_cap * sizeof(size_t));
    char **sorted = NULL;
    int ret = 0;
    if (!buf || !offs) {
        ret = -ENOMEM;
        goto out;
    }
    const char *dname;
    while ((dname = next_name(d, &ret)) != NULL) {
        size_t len = strlen(dname) + 1;
        if (buf_used + len > buf_cap) {
            while (buf_used + len > buf_cap)
                buf_cap *= 2;
            char *nb = realloc(buf, buf_cap);
            if (!nb) {
                ret = -ENOMEM;
                goto out;
            }
            buf = nb;
        }
        if (n == ptr_cap) {
            ptr_cap *= 2;
            size_t *no = realloc(offs, ptr_cap * sizeof(size_t));
            if (!no) {
                ret = -ENOMEM;
                goto out;
            }
            offs = no;
        }
        memcpy(buf + buf_used, dname, len);
        offs[n++] = buf_used;
        buf_used += len;
    }
    if (ret < 0)
        goto out;
    sorted = malloc((n ? n : 1) * sizeof(char *));
    if (!sorted) {
        ret = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        sorted[i] = buf + offs[i];
    qsort(sorted, n, sizeof(char *), cmp_names);

    int nsub = 0;
    struct cwd_state cwd = CWD_STATE_INIT;
    int64_t used = 0, name_used = 0, others = 0, why = 0;
    struct stat s;
    char target[4097];
    for (size_t i = 0; i < n && !why; i++) {
        const char *name = sorted[i];
        size_t len = strlen(name);
        if (is_tmp_name(name, len)) {
            why = BLIT_DD_TMP;
            break;
        }
        if (fstatat(dfd, name, &s, AT_SYMLINK_NOFOLLOW) != 0) {
            ret = errno == ENOENT ? -EAGAIN : -errno;
            break;
        }
        if (!times_fit(&s)) {
            ret = -EOVERFLOW;
            break;
        }
        char kind;
        ssize_t tlen = 0;
        if (!S_ISDIR(s.st_mode) && s.st_nlink > 1) {
            /* any non-directory with other names (a file, symlink, FIFO...): its group is settled
               from manifests (decisions R58), never hidden behind a digest */
            why = BLIT_DD_HARDLINK;
            break;
        }
        if (S_ISREG(s.st_mode)) {
            kind = 'f';
        } else if (S_ISDIR(s.st_mode)) {
            kind = 'd';
        } else if (S_ISLNK(s.st_mode)) {
            kind = 'l';
            tlen = readlinkat(dfd, name, target, sizeof(target));
            if (tlen < 0) {
                ret = errno == ENOENT ? -EAGAIN : -errno;
                break;
            }
            if (tlen >= (ssize_t)sizeof(target) - 1) {
                why = BLIT_DD_KIND;
                break;
            }
        } else if (S_ISFIFO(s.st_mode)) {
            kind = 'p';
        } else {
            why = BLIT_DD_KIND;
            break;
        }
        int x = has_xattrs(dfd, name, &cwd);
        if (x < 0) {
            ret = x;
            break;
        }
        if (x) {
            why = BLIT_DD_XATTRS;
            break;
        }
        int64_t need = 2 + (int64_t)len + 1 + 4 + 8 + 8 + 4 + 4 + 2 + tlen;
        if (used + need > out_cap) {
            ret = -ENOBUFS;
            break;
        }
        char *p = out + used;
        p = put_le(p, len, 2);
        memcpy(p, name, len);
        p += len;
        *p++ = kind;
        p = put_le(p, s.st_mode & 07777, 4);
        p = put_le(p, kind == 'f' ? (uint64_t)s.st_size : 0, 8);
        p = put_le(p, (uint64_t)((int64_t)s.st_mtim.tv_sec * 1000000000 + s.st_mtim.tv_nsec), 8);
        p = put_le(p, (flags & BLIT_DIGEST_OWNER) ? s.st_uid : 0, 4);
        p = put_le(p, (flags & BLIT_DIGEST_OWNER) ? s.st_gid : 0, 4);
        p = put_le(p, (uint64_t)tlen, 2);
        if (tlen) {
            memcpy(p, target, (size_t)tlen);
            p += tlen;
        }
        used = p - out;
        if (kind == 'd') {
            int64_t *r = sub + (int64_t)nsub * BLIT_SUB_FIELDS;
            if (nsub >= sub_cap || put_named(r, names, names_cap, &name_used, name, len, &s) < 0) {
                ret = -ENOBUFS;
                break;
            }
            nsub++;
        } else {
            others++;
        }
    }
    ret = cwd_restore(&cwd, ret);
    if (ret >= 0) {
        counts[0] = used;
        counts[1] = (int64_t)n;
        counts[2] = why;
        counts[3] = others;
        ret = why ? 0 : nsub;
    }
out:
    closedir(d);
    free(buf);
    free(offs);
    free(sorted);
    return ret;
}

/* blit_scan_packed: one directory's plain entries as a packed manifest (the remote sender's
 * scan, docs/decisions.md R37; any size since R72), in protocol.pack_entries' layout: u32 count,
 * then one little-endian column per lstat field (mode u32, size i64, mtime_ns i64, atime_ns i64,
 * uid u32, gid u32, ino u64, dev u64, nlink u32, rdev u64, blocks i64), then the names, each
 * followed by a NUL. An entry is plain unless it is a symlink, carries an xattr (or its xattrs
 * cannot be listed), or vanished before its lstat: those names go to `*others_p` (each followed
 * by a NUL) for the caller's per-entry path, in directory order. Temporaries (.blit-*.tmp) are
 * left out, or go to `*others_p` with BLIT_KEEP_TMP (the destination's scan, R72). `*out_p` and `*others_p` are
 * malloc'ed here (NULL when empty or on failure); the caller frees them with blit_free.
 *
 * counts[0] = bytes in `*out_p`, counts[1] = plain entries, counts[2] = bytes in `*others_p`,
 * counts[3] = other entries. Returns 0, or -errno: -ENOBUFS past `max_entries` entries (the
 * caller scans in Python), -ENOMEM, anything else from the system. It must not change anything
 * on disk or follow a symlink.
 */
/* Grow `*buf` (of `*cap` bytes) to hold at least `need`; 0, or -ENOMEM (the buffer unchanged). */
static int grow(char **buf, int64_t *cap, int64_t need) {
    if (need <= *cap)
        return 0;
    int64_t c = *cap ? *cap : 4096;
    while (c < need)
        c *= 2;
    char *nb = realloc(*buf, (size_t)c);
    if (!nb)
        return -ENOMEM;
    *buf = nb;
    *cap = c;
    return 0;
}

static void blit_free(void *p) { free(p); }

static int blit_scan_packed(int dfd, int flags, int64_t max_entries, char **out_p, char **others_p, int64_t *counts) {
    static const int widths[11] = {4, 8, 8, 8, 4, 4, 8, 8, 4, 8, 8};
    *out_p = NULL;
    *others_p = NULL;
    if (have_listxattrat == 0 && (flags & BLIT_CHECK_XATTRS))
        probe_listxattrat();
    int oerr = 0;
    DIR *d = open_stream(dfd, &oerr);
    if (!d)
        return -oerr;
    int64_t n = 0, name_used = 0, other_used = 0, nother = 0;
    int64_t rec_cap = 0, names_cap = 0, others_cap = 0;
    char *rec = NULL, *names = NULL, *others = NULL;
    int ret = 0;
    struct cwd_state cwd = CWD_STATE_INIT;
    struct stat s;
    const char *name;
    while ((name = next_name(d, &ret)) != NULL) {
        size_t len = strlen(name);
        int tmp = is_tmp_name(name, len);
        if (tmp && !(flags & BLIT_KEEP_TMP))
            continue; /* a run's temporary is never a source entry (fsops.scan) */
        if (n + nother >= max_entries) {
            ret = -ENOBUFS;
            break;
        }
        int plain = 1;
        if (tmp) {
            plain = 0; /* the destination's: fsops.without_tmp decides */
        } else if (fstatat(dfd, name, &s, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno != ENOENT) {
                ret = -errno;
                break;
            }
            plain = 0; /* vanished: the caller's lstat reports it */
        } else if (S_ISLNK(s.st_mode) || !times_fit(&s)) {
            plain = 0;
        } else if (flags & BLIT_CHECK_XATTRS) {
            plain = has_xattrs(dfd, name, &cwd) == 0;
        }
        if (!plain) {
            if ((ret = grow(&others, &others_cap, other_used + (int64_t)len + 1)) < 0)
                break;
            memcpy(others + other_used, name, len + 1);
            other_used += (int64_t)len + 1;
            nother++;
            continue;
        }
        if ((ret = grow(&names, &names_cap, name_used + (int64_t)len + 1)) < 0 ||
            (ret = grow(&rec, &rec_cap, (n + 1) * 11 * (int64_t)sizeof(int64_t))) < 0)
            break;
        memcpy(names + name_used, name, len + 1);
        name_used += (int64_t)len + 1;
        put_stat((int64_t *)rec + n * 11, &s);
        n++;
    }
    closedir(d);
    ret = cwd_restore(&cwd, ret);
    char *out = NULL;
    int64_t need = 4 + n * 72 + name_used;
    if (ret >= 0 && !(out = malloc((size_t)need)))
        ret = -ENOMEM;
    if (ret >= 0) {
        char *p = out;
        const int64_t *r = (const int64_t *)rec;
        p = put_le(p, (uint64_t)n, 4);
        for (int c = 0; c < 11; c++)
            for (int64_t i = 0; i < n; i++)
                p = put_le(p, (uint64_t)r[i * 11 + c], widths[c]);
        if (name_used)
            memcpy(p, names, (size_t)name_used);
        counts[0] = need;
        counts[1] = n;
        counts[2] = other_used;
        counts[3] = nother;
        *out_p = out;
        *others_p = others;
        others = NULL;
    }
    free(rec);
    free(names);
    free(others);
    return ret < 0 ? ret : 0;
}

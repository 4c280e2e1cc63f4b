/* blit_cmpdir: compare one source directory with its destination in a single call.
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
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLIT_SCAN_VERSION 2
#define BLIT_CHECK_OWNER 1
#define BLIT_CHECK_XATTRS 2
#define BLIT_REC_FIELDS 25

#ifndef SYS_listxattrat
#if defined(__x86_64__) || defined(__aarch64__) || defined(__i386__) || defined(__arm__)
#define SYS_listxattrat 465
#endif
#endif

static int blit_version(void) { return BLIT_SCAN_VERSION; }


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

/* Does the entry carry any xattr? 0 no, 1 yes, -errno on failure. Without listxattrat, the
 * thread's cwd (made private by unshare CLONE_FS) is moved to `dfd`; `cwd_fd` tracks where it
 * points and the caller restores it before returning to Python. */
static int has_xattrs(int dfd, const char *name, int *cwd_fd) {
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
    if (*cwd_fd != dfd) {
        if (fchdir(dfd) != 0)
            return -errno;
        *cwd_fd = dfd;
    }
    n = llistxattr(name, NULL, 0);
    if (n >= 0)
        return n > 0;
    return (errno == ENOTSUP || errno == EOPNOTSUPP) ? 0 : -errno;
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

/* Count a directory's entries (without . and ..); -errno on failure. */
static int64_t count_entries(int dfd) {
    int fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return -e;
    }
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
    int fd = openat(sfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return -e;
    }
    int nrec = 0, ret = 0, cwd_fd = -1, saved_cwd = -1;
    int64_t clean = 0, total = 0, found = 0, name_used = 0;
    struct dirent *e;
    struct stat s, t;
    for (;;) {
        errno = 0;
        e = readdir(d);
        if (!e) {
            if (errno)
                ret = -errno;
            break;
        }
        const char *name = e->d_name;
        if (is_dot(name))
            continue;
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
        if (present && S_ISREG(s.st_mode) && S_ISREG(t.st_mode) && s.st_nlink == 1 &&
            s.st_size == t.st_size && s.st_mtim.tv_sec == t.st_mtim.tv_sec &&
            s.st_mtim.tv_nsec == t.st_mtim.tv_nsec &&
            (s.st_mode & 07777) == (t.st_mode & 07777) &&
            (!(flags & BLIT_CHECK_OWNER) || (s.st_uid == t.st_uid && s.st_gid == t.st_gid))) {
            int dirty = 0;
            if (flags & BLIT_CHECK_XATTRS) {
                if (saved_cwd < 0 && have_listxattrat < 0) {
                    saved_cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
                    if (saved_cwd < 0) {
                        ret = -errno;
                        break;
                    }
                }
                int a = has_xattrs(sfd, name, &cwd_fd);
                int b = a == 0 ? has_xattrs(dfd, name, &cwd_fd) : 0;
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
        size_t len = strlen(name);
        if (nrec >= rec_cap || name_used + (int64_t)len > names_cap) {
            ret = -ENOBUFS;
            break;
        }
        int64_t *r = rec + (int64_t)nrec * BLIT_REC_FIELDS;
        memcpy(names + name_used, name, len);
        r[0] = name_used;
        r[1] = (int64_t)len;
        name_used += (int64_t)len;
        put_stat(r + 2, &s);
        r[13] = present;
        if (present)
            put_stat(r + 14, &t);
        else
            memset(r + 14, 0, 11 * sizeof(int64_t));
        nrec++;
    }
    closedir(d);
    if (saved_cwd >= 0) {
        if (fchdir(saved_cwd) != 0 && ret >= 0)
            ret = -errno;
        close(saved_cwd);
    }
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

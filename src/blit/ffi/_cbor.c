/* blit_cbor_containers: count the maps, arrays and tags of one CBOR item (RFC 8949) without
 * decoding it, for blit.transport.protocol.decode: a peer's body of 8 MiB of empty maps decodes
 * to ~600 MiB of Python objects, so a body with more containers than the caller allows is
 * refused before cbor2 sees it.
 *
 * Returns the count (>= 0) when the item is well formed as far as this walk checks, -1 as soon
 * as the count passes `limit`, -2 when it cannot tell (truncated, reserved encodings, nesting
 * deeper than it tracks): the caller then lets the decoder say what is wrong. It must not
 * allocate, nor judge anything but counts (the decoder checks everything else).
 * Concatenated after _scan.c by _build_scan.py (one translation unit).
 */
#include <stdint.h>

#define BLIT_CBOR_DEPTH 64

static int64_t blit_cbor_containers(const char *body, int64_t len, int64_t limit) {
    const unsigned char *p = (const unsigned char *)body;
    /* remaining[d]: items still to come in the container at depth d; -1: indefinite length. */
    int64_t remaining[BLIT_CBOR_DEPTH];
    int64_t pos = 0, count = 0;
    int d = 0;
    remaining[0] = 1; /* the top-level item */
    for (;;) {
        while (remaining[d] == 0) {
            if (d == 0)
                return count;
            d--;
        }
        if (pos >= len)
            return -2;
        unsigned char b = p[pos++];
        if (b == 0xff) { /* break: ends the innermost indefinite container */
            if (remaining[d] != -1 || d == 0)
                return -2;
            d--;
            continue;
        }
        if (remaining[d] > 0)
            remaining[d]--;
        int major = b >> 5, info = b & 31;
        uint64_t arg = 0;
        int indefinite = 0;
        if (info < 24) {
            arg = (uint64_t)info;
        } else if (info <= 27) {
            int n = 1 << (info - 24);
            if (len - pos < n)
                return -2;
            for (int k = 0; k < n; k++)
                arg = (arg << 8) | p[pos + k];
            pos += n;
        } else if (info == 31 && major >= 2 && major <= 5) {
            indefinite = 1;
        } else {
            return -2;
        }
        int64_t items;
        switch (major) {
        case 2:
        case 3:
            if (indefinite) { /* chunks follow, then a break: one string, not a container */
                items = -1;
                break;
            }
            if (arg > (uint64_t)(len - pos))
                return -2;
            pos += (int64_t)arg;
            continue;
        case 4:
        case 5:
            if (++count > limit)
                return -1;
            if (indefinite) {
                items = -1;
                break;
            }
            /* every item takes a byte at least: a longer count is a truncated body */
            if (arg > (uint64_t)(len - pos) || (major == 5 && 2 * arg > (uint64_t)(len - pos)))
                return -2;
            items = major == 5 ? (int64_t)(2 * arg) : (int64_t)arg;
            break;
        case 6:
            if (++count > limit)
                return -1;
            items = 1; /* the tagged item */
            break;
        default: /* integers, simple values, floats: their bytes were the argument */
            continue;
        }
        if (items == 0)
            continue;
        if (d + 1 >= BLIT_CBOR_DEPTH)
            return -2;
        remaining[++d] = items;
    }
}

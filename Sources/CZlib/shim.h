#ifndef PARLEY_CZLIB_SHIM_H
#define PARLEY_CZLIB_SHIM_H
#include <stdlib.h>
#include <zlib.h>

// deflateInit2 and inflateInit2 are macros (they pass the header's version and struct size),
// which Swift cannot import; these call the functions behind them. A negative windowBits
// selects raw deflate, which permessage-deflate (RFC 7692) uses.
static inline int parley_deflate_init(z_streamp stream, int level, int windowBits, int memLevel) {
    return deflateInit2(stream, level, Z_DEFLATED, -windowBits, memLevel, Z_DEFAULT_STRATEGY);
}

static inline int parley_inflate_init(z_streamp stream, int windowBits) {
    return inflateInit2(stream, -windowBits);
}

// Allocation hooks that count the bytes zlib holds for one stream in *(size_t *)opaque, so the
// memory a socket's compressor costs can be reported and bounded by a test.
static inline voidpf parley_zalloc(voidpf opaque, uInt items, uInt size) {
    size_t bytes = (size_t)items * size;
    size_t *block = (size_t *)malloc(bytes + sizeof(size_t) * 2);
    if (block == NULL) return Z_NULL;
    block[0] = bytes;
    *(size_t *)opaque += bytes;
    return (voidpf)(block + 2);
}

static inline void parley_zfree(voidpf opaque, voidpf address) {
    if (address == Z_NULL) return;
    size_t *block = (size_t *)address - 2;
    *(size_t *)opaque -= block[0];
    free(block);
}

static inline void parley_zstream_prepare(z_streamp stream, size_t *counter) {
    stream->zalloc = parley_zalloc;
    stream->zfree = parley_zfree;
    stream->opaque = (voidpf)counter;
}
#endif

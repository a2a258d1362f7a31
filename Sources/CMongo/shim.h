#ifndef PARLEY_CMONGO_SHIM_H
#define PARLEY_CMONGO_SHIM_H
// The MongoDB C driver (Debian libmongoc-dev, libbson-dev). Parley uses a deliberately small part
// of it: a client pool, generic commands, and BSON <-> extended JSON conversion.
#include <mongoc/mongoc.h>

// bson_t is declared 128-byte aligned; Swift callers allocate it through these helpers so the
// alignment is right and the memory is owned by exactly one Swift object.
static inline size_t parley_bson_size(void) { return sizeof(bson_t); }
static inline size_t parley_bson_alignment(void) { return BSON_ALIGNOF(bson_t); }
#endif

/* pt-host native plugin ABI, version 1.
 *
 * A native plugin is a shared library that pt-host loads with --allow_native.
 * It is NOT sandboxed: it runs with pt-host's rights. Use it for trusted code
 * that needs native speed or native libraries; prefer WebAssembly components
 * otherwise. Mapper and filter steps only.
 *
 * Strings are UTF-8 and not NUL-terminated. Strings the plugin returns stay
 * valid until its next call on the same instance (or, for `error`, the next
 * call of pt_native_new). Instances are used from one thread at a time; a
 * run makes one instance per worker thread.
 */
#ifndef PT_NATIVE_PLUGIN_H
#define PT_NATIVE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#define PT_NATIVE_ABI_VERSION 1

typedef struct { const uint8_t *ptr; size_t len; } pt_str;

enum { PT_KEEP = 0, PT_REPLACE = 1, PT_DROP = 2, PT_ERROR = 3 };
enum { PT_MAPPER = 0, PT_FILTER = 1 };

/* tag: PT_KEEP, PT_REPLACE (text: the new text), PT_DROP (text: the reason),
 * PT_ERROR (text: why this document could not be processed). */
typedef struct { uint32_t tag; pt_str text; } pt_verdict;

/* Must return PT_NATIVE_ABI_VERSION. */
uint32_t pt_native_abi_version(void);
/* Static JSON: {"id", "version", "description", "kinds": ["mapper"|"filter", ...], "config_schema"}. */
pt_str pt_native_describe(void);
/* A configured instance, or NULL with *error set when the JSON config is rejected. */
void *pt_native_new(pt_str config, pt_str *error);
/* One verdict per document into out[0..n]; returns 0, or non-zero when the whole call failed. */
int32_t pt_native_apply(void *instance, uint32_t kind, const pt_str *docs, size_t n, pt_verdict *out);
void pt_native_free(void *instance);

#endif

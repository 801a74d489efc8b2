// length_filter: a pt-host filter written in C (wit-bindgen c + wasi-libc).
//
// A fast first pass over a scraped corpus, on raw UTF-8 without decoding
// into a string type: drops documents that are too short or too long
// (counted in non-space code points), dominated by one repeated character
// ("哈哈哈哈…", "-----"), or made mostly of duplicate lines.
//
// Ownership (the component model's canonical ABI as wit-bindgen c maps it):
// arguments belong to the callee and are freed here; returned strings are
// malloc'd and freed by the generated post-return functions.

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "filter_plugin.h"

static struct {
  double min_chars;
  double max_chars;
  double max_char_fraction;
  double max_duplicate_line_fraction;
} config = {10, 100000, 0.5, 0.3};

static const char *SCHEMA =
    "{\"$schema\":\"https://json-schema.org/draft/2020-12/schema\","
    "\"title\":\"length_filter configuration\",\"type\":\"object\",\"additionalProperties\":false,"
    "\"properties\":{"
    "\"min_chars\":{\"type\":\"number\",\"default\":10},"
    "\"max_chars\":{\"type\":\"number\",\"default\":100000},"
    "\"max_char_fraction\":{\"type\":\"number\",\"default\":0.5},"
    "\"max_duplicate_line_fraction\":{\"type\":\"number\",\"default\":0.3}}}";

void exports_pt_plugin_plugin_describe(exports_pt_plugin_plugin_info_t *ret) {
  filter_plugin_string_dup(&ret->id, "length_filter");
  filter_plugin_string_dup(&ret->version, "0.1.0");
  filter_plugin_string_dup(&ret->description,
                           "Drops too short, too long, one-character and duplicate-line documents (C)");
  ret->kinds.len = 1;
  ret->kinds.ptr = malloc(1);
  ret->kinds.ptr[0] = PT_PLUGIN_TYPES_KIND_FILTER;
  filter_plugin_string_dup(&ret->config_schema, SCHEMA);
}

// The error `message` + `detail` (cut to 100 bytes). No stdio: it would pull
// in WASI file descriptors the plugin has no use for.
static void fail(filter_plugin_string_t *err, const char *message, const char *detail) {
  size_t a = strlen(message), b = strnlen(detail, 100);
  char *text = malloc(a + b + 1);
  memcpy(text, message, a);
  memcpy(text + a, detail, b);
  text[a + b] = 0;
  filter_plugin_string_dup(err, text);
  free(text);
}

// A flat JSON object of numbers: {"key": number, ...}.
bool exports_pt_plugin_plugin_configure(filter_plugin_string_t *text, filter_plugin_string_t *err) {
  char *json = malloc(text->len + 1);
  memcpy(json, text->ptr, text->len);
  json[text->len] = 0;
  filter_plugin_string_free(text);
  bool ok = true;
  char *p = json;
  while (isspace((unsigned char)*p)) p++;
  if (*p++ != '{') {
    fail(err, "configuration must be a JSON object", "");
    ok = false;
  }
  while (ok) {
    while (isspace((unsigned char)*p) || *p == ',') p++;
    if (*p == '}') break;
    if (*p != '"') {
      fail(err, "configuration is not valid JSON near: ", p);
      ok = false;
      break;
    }
    char *key = ++p;
    while (*p && *p != '"') p++;
    if (!*p) {
      fail(err, "configuration is not valid JSON", "");
      ok = false;
      break;
    }
    *p++ = 0;
    while (isspace((unsigned char)*p) || *p == ':') p++;
    char *end;
    double value = strtod(p, &end);
    if (end == p) {
      fail(err, "expected a number for key ", key);
      ok = false;
      break;
    }
    p = end;
    if (strcmp(key, "min_chars") == 0) config.min_chars = value;
    else if (strcmp(key, "max_chars") == 0) config.max_chars = value;
    else if (strcmp(key, "max_char_fraction") == 0) config.max_char_fraction = value;
    else if (strcmp(key, "max_duplicate_line_fraction") == 0) config.max_duplicate_line_fraction = value;
    else {
      fail(err, "unknown key (known: min_chars, max_chars, max_char_fraction, "
                "max_duplicate_line_fraction): ", key);
      ok = false;
    }
  }
  free(json);
  return ok;
}

// Decodes one UTF-8 code point at s[*i] (malformed bytes count as one each).
static uint32_t next_code_point(const uint8_t *s, size_t len, size_t *i) {
  uint8_t b = s[(*i)++];
  int extra = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : 0;
  uint32_t cp = extra == 3 ? b & 0x07 : extra == 2 ? b & 0x0F : extra == 1 ? b & 0x1F : b;
  while (extra-- > 0 && *i < len && (s[*i] & 0xC0) == 0x80) cp = (cp << 6) | (s[(*i)++] & 0x3F);
  return cp;
}

static int is_space(uint32_t cp) {
  return cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || cp == 0x3000 || cp == 0xA0;
}

static uint64_t hash_line(const uint8_t *s, size_t len) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (size_t i = 0; i < len; i++) h = (h ^ s[i]) * 1099511628211ULL;
  return h;
}

static int compare_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

// NULL to keep, else the drop reason.
static const char *judge(const uint8_t *s, size_t len) {
  // Code point counts through a small open-addressing table.
  enum { SLOTS = 4096 };
  static uint32_t keys[SLOTS], counts[SLOTS];
  memset(counts, 0, sizeof counts);
  size_t chars = 0, top = 0, i = 0;
  while (i < len) {
    uint32_t cp = next_code_point(s, len, &i);
    if (is_space(cp)) continue;
    chars++;
    size_t slot = (cp * 2654435761u) % SLOTS;
    while (counts[slot] && keys[slot] != cp) slot = (slot + 1) % SLOTS;
    keys[slot] = cp;
    if (++counts[slot] > top) top = counts[slot];
  }
  if (chars < config.min_chars) return "too_short";
  if (chars > config.max_chars) return "too_long";
  if (chars >= 20 && top > config.max_char_fraction * chars) return "repeated_character";
  // Duplicate non-empty lines, by hash.
  size_t lines = 0, capacity = 16;
  uint64_t *hashes = malloc(capacity * sizeof *hashes);
  for (size_t start = 0; start < len;) {
    size_t end = start;
    while (end < len && s[end] != '\n') end++;
    if (end > start) {
      if (lines == capacity) hashes = realloc(hashes, (capacity *= 2) * sizeof *hashes);
      hashes[lines++] = hash_line(s + start, end - start);
    }
    start = end + 1;
  }
  size_t duplicates = 0;
  if (lines >= 3) {
    qsort(hashes, lines, sizeof *hashes, compare_u64);
    for (size_t k = 1; k < lines; k++) duplicates += hashes[k] == hashes[k - 1];
  }
  free(hashes);
  if (lines >= 3 && duplicates > config.max_duplicate_line_fraction * lines) return "duplicate_lines";
  return NULL;
}

void exports_pt_plugin_filter_filter_batch(exports_pt_plugin_filter_list_document_t *docs,
                                           exports_pt_plugin_filter_list_decision_t *ret) {
  ret->len = docs->len;
  ret->ptr = malloc(docs->len * sizeof *ret->ptr + 1);
  for (size_t d = 0; d < docs->len; d++) {
    const char *reason = judge(docs->ptr[d].text.ptr, docs->ptr[d].text.len);
    if (reason) {
      ret->ptr[d].tag = PT_PLUGIN_TYPES_DECISION_DROP;
      filter_plugin_string_dup(&ret->ptr[d].val.drop, reason);
    } else {
      ret->ptr[d].tag = PT_PLUGIN_TYPES_DECISION_KEEP;
    }
  }
  exports_pt_plugin_filter_list_document_free(docs);
}

#include <stdlib.h>
#include <string.h>

#include "filter_plugin.h"

static size_t min_chars = 10;

void exports_pt_plugin_plugin_describe(exports_pt_plugin_plugin_info_t *ret) {
  filter_plugin_string_dup(&ret->id, "{{name}}");
  filter_plugin_string_dup(&ret->version, "0.1.0");
  filter_plugin_string_dup(&ret->description, "Drops documents shorter than min_chars");
  ret->kinds.len = 1;
  ret->kinds.ptr = malloc(1);
  ret->kinds.ptr[0] = PT_PLUGIN_TYPES_KIND_FILTER;
  filter_plugin_string_dup(&ret->config_schema,
      "{\"type\":\"object\",\"properties\":{\"min_chars\":{\"type\":\"integer\",\"default\":10}}}");
}

// Accepts `{}` or `{"min_chars": N}`.
bool exports_pt_plugin_plugin_configure(filter_plugin_string_t *text, filter_plugin_string_t *err) {
  char *json = calloc(text->len + 1, 1);
  memcpy(json, text->ptr, text->len);
  filter_plugin_string_free(text);
  char *key = strstr(json, "\"min_chars\"");
  bool ok = true;
  if (key) {
    char *colon = strchr(key, ':');
    min_chars = colon ? strtoul(colon + 1, NULL, 10) : min_chars;
  } else if (strchr(json, '"')) {
    filter_plugin_string_dup(err, "unknown key (known: min_chars)");
    ok = false;
  }
  free(json);
  return ok;
}

static size_t visible_chars(const uint8_t *s, size_t len) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    uint8_t b = s[i];
    if ((b & 0xC0) == 0x80 || b == ' ' || b == '\n' || b == '\t' || b == '\r') continue;
    n++;
  }
  return n;
}

void exports_pt_plugin_filter_filter_batch(exports_pt_plugin_filter_list_document_t *docs,
                                           exports_pt_plugin_filter_list_decision_t *ret) {
  ret->len = docs->len;
  ret->ptr = malloc(docs->len * sizeof *ret->ptr + 1);
  for (size_t d = 0; d < docs->len; d++) {
    if (visible_chars(docs->ptr[d].text.ptr, docs->ptr[d].text.len) < min_chars) {
      ret->ptr[d].tag = PT_PLUGIN_TYPES_DECISION_DROP;
      filter_plugin_string_dup(&ret->ptr[d].val.drop, "too_short");
    } else {
      ret->ptr[d].tag = PT_PLUGIN_TYPES_DECISION_KEEP;
    }
  }
  exports_pt_plugin_filter_list_document_free(docs);
}

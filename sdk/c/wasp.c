/* The wasp C SDK: the component's exports, helpers, and a small JSON reader and writer.
 * See wasp.h. */
#include "wasp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Memory. ---- */

static void *xrealloc(void *ptr, size_t size) {
    void *p = realloc(ptr, size ? size : 1);
    if (!p) abort(); /* Out of memory: the host sees a trap and drops the instance. */
    return p;
}

static char *xstrndup(const char *s, size_t n) {
    char *p = xrealloc(NULL, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static void set_string(full_string_t *out, const char *s, size_t n) {
    out->ptr = n ? (uint8_t *)xstrndup(s, n) : NULL;
    out->len = n;
}

/* ---- Buffers. ---- */

void wasp_buf_put(wasp_buf_t *buf, const void *data, size_t length) {
    if (buf->length + length > buf->capacity) {
        size_t capacity = buf->capacity ? buf->capacity * 2 : 64;
        while (capacity < buf->length + length) capacity *= 2;
        buf->data = xrealloc(buf->data, capacity);
        buf->capacity = capacity;
    }
    if (length) memcpy(buf->data + buf->length, data, length);
    buf->length += length;
}

void wasp_buf_puts(wasp_buf_t *buf, const char *text) { wasp_buf_put(buf, text, strlen(text)); }

static void buf_vprintf(wasp_buf_t *buf, const char *format, va_list args) {
    va_list copy;
    va_copy(copy, args);
    int n = vsnprintf(NULL, 0, format, copy);
    va_end(copy);
    if (n <= 0) return;
    wasp_buf_put(buf, NULL, 0);
    if (buf->length + (size_t)n + 1 > buf->capacity) {
        buf->capacity = buf->length + (size_t)n + 1;
        buf->data = xrealloc(buf->data, buf->capacity);
    }
    vsnprintf((char *)buf->data + buf->length, (size_t)n + 1, format, args);
    buf->length += (size_t)n;
}

void wasp_buf_printf(wasp_buf_t *buf, const char *format, ...) {
    va_list args;
    va_start(args, format);
    buf_vprintf(buf, format, args);
    va_end(args);
}

void wasp_buf_json_string(wasp_buf_t *buf, const char *text, size_t length) {
    static const char hex[] = "0123456789abcdef";
    wasp_buf_put(buf, "\"", 1);
    size_t start = 0;
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        const char *escape = NULL;
        char unicode[7];
        switch (c) {
        case '"': escape = "\\\""; break;
        case '\\': escape = "\\\\"; break;
        case '\n': escape = "\\n"; break;
        case '\r': escape = "\\r"; break;
        case '\t': escape = "\\t"; break;
        case '\b': escape = "\\b"; break;
        case '\f': escape = "\\f"; break;
        default:
            if (c < 0x20) {
                memcpy(unicode, "\\u00", 4);
                unicode[4] = hex[c >> 4];
                unicode[5] = hex[c & 15];
                unicode[6] = 0;
                escape = unicode;
            }
        }
        if (escape) {
            wasp_buf_put(buf, text + start, i - start);
            wasp_buf_puts(buf, escape);
            start = i + 1;
        }
    }
    wasp_buf_put(buf, text + start, length - start);
    wasp_buf_put(buf, "\"", 1);
}

void wasp_buf_free(wasp_buf_t *buf) {
    free(buf->data);
    buf->data = NULL;
    buf->length = buf->capacity = 0;
}

/* ---- Errors, requests, responses. ---- */

bool wasp_fail(wasp_error_t *error, wasp_error_code_t code, const char *field,
               const char *format, ...) {
    wasp_buf_t message = {0};
    va_list args;
    va_start(args, format);
    buf_vprintf(&message, format, args);
    va_end(args);
    error->code = (wasp_processor_types_error_code_t)code;
    error->message.ptr = message.length ? message.data : NULL;
    error->message.len = message.length;
    if (!message.length) free(message.data);
    error->field.is_some = field != NULL;
    if (field) set_string(&error->field.val, field, strlen(field));
    return false;
}

const char *wasp_request_header(const wasp_request_t *request, const char *name, size_t *length) {
    size_t n = strlen(name);
    for (size_t i = 0; i < request->headers.len; i++) {
        const full_tuple2_string_string_t *h = &request->headers.ptr[i];
        if (h->f0.len != n) continue;
        bool same = true;
        for (size_t j = 0; j < n && same; j++) {
            char a = (char)h->f0.ptr[j], b = name[j];
            if (a >= 'A' && a <= 'Z') a += 32;
            if (b >= 'A' && b <= 'Z') b += 32;
            same = a == b;
        }
        if (same) {
            if (length) *length = h->f1.len;
            return (const char *)h->f1.ptr;
        }
    }
    return NULL;
}

void wasp_response_add_header(wasp_response_t *response, const char *name, const char *value) {
    size_t n = response->headers.len;
    response->headers.ptr = xrealloc(response->headers.ptr, (n + 1) * sizeof(*response->headers.ptr));
    set_string(&response->headers.ptr[n].f0, name, strlen(name));
    set_string(&response->headers.ptr[n].f1, value, strlen(value));
    response->headers.len = n + 1;
}

void wasp_response_take(wasp_response_t *response, uint16_t status, const char *content_type,
                        wasp_buf_t *body) {
    memset(response, 0, sizeof(*response));
    response->status = status;
    wasp_response_add_header(response, "content-type", content_type);
    if (body->length) {
        response->body.ptr = body->data;
        response->body.len = body->length;
    } else {
        free(body->data);
    }
    body->data = NULL;
    body->length = body->capacity = 0;
}

void wasp_response_json(wasp_response_t *response, uint16_t status, wasp_buf_t *body) {
    wasp_response_take(response, status, "application/json", body);
}

void wasp_response_text(wasp_response_t *response, uint16_t status, const char *text) {
    wasp_buf_t body = {0};
    wasp_buf_puts(&body, text);
    wasp_response_take(response, status, "text/plain; charset=utf-8", &body);
}

/* ---- Host imports. ---- */

void wasp_log(wasp_log_level_t level, const char *format, ...) {
    wasp_buf_t text = {0};
    va_list args;
    va_start(args, format);
    buf_vprintf(&text, format, args);
    va_end(args);
    full_string_t message = {text.data, text.length};
    wasp_processor_log_log((wasp_processor_log_level_t)level, &message);
    wasp_buf_free(&text);
}

char *wasp_config_get(const char *key) {
    full_string_t k = {(uint8_t *)key, strlen(key)};
    full_string_t value;
    if (!wasp_processor_config_get(&k, &value)) return NULL;
    char *out = xstrndup((const char *)value.ptr, value.len);
    full_string_free(&value);
    return out;
}

/* ---- JSON. ---- */

typedef struct {
    const uint8_t *at;
    const uint8_t *end;
    const uint8_t *start;
    char *message;
    size_t message_size;
    bool failed;
} parser_t;

static void *parse_error(parser_t *p, const char *what) {
    if (!p->failed) {
        snprintf(p->message, p->message_size, "%s at byte %zu", what, (size_t)(p->at - p->start));
        p->failed = true;
    }
    return NULL;
}

static void skip_space(parser_t *p) {
    while (p->at < p->end && (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r'))
        p->at++;
}

static wasp_json_t *new_value(wasp_json_type_t type) {
    wasp_json_t *v = xrealloc(NULL, sizeof(*v));
    memset(v, 0, sizeof(*v));
    v->type = type;
    return v;
}

static void put_utf8(wasp_buf_t *buf, uint32_t cp) {
    uint8_t b[4];
    size_t n;
    if (cp < 0x80) { b[0] = (uint8_t)cp; n = 1; }
    else if (cp < 0x800) { b[0] = 0xC0 | (cp >> 6); b[1] = 0x80 | (cp & 63); n = 2; }
    else if (cp < 0x10000) { b[0] = 0xE0 | (cp >> 12); b[1] = 0x80 | ((cp >> 6) & 63); b[2] = 0x80 | (cp & 63); n = 3; }
    else { b[0] = 0xF0 | (cp >> 18); b[1] = 0x80 | ((cp >> 12) & 63); b[2] = 0x80 | ((cp >> 6) & 63); b[3] = 0x80 | (cp & 63); n = 4; }
    wasp_buf_put(buf, b, n);
}

static bool hex4(parser_t *p, uint32_t *out) {
    if (p->end - p->at < 4) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p->at[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return false;
    }
    p->at += 4;
    *out = v;
    return true;
}

/* The length of a valid UTF-8 sequence at `s` (at most `n` bytes), or 0. */
static size_t utf8_length(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 63);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return len;
}

static bool parse_string_raw(parser_t *p, wasp_buf_t *out) {
    p->at++; /* the opening quote */
    while (p->at < p->end) {
        uint8_t c = *p->at;
        if (c == '"') {
            p->at++;
            wasp_buf_put(out, "", 1); /* NUL terminator, not counted */
            out->length--;
            return true;
        }
        if (c < 0x20) return parse_error(p, "control character in string"), false;
        if (c == '\\') {
            p->at++;
            if (p->at >= p->end) break;
            uint8_t e = *p->at++;
            switch (e) {
            case '"': wasp_buf_put(out, "\"", 1); break;
            case '\\': wasp_buf_put(out, "\\", 1); break;
            case '/': wasp_buf_put(out, "/", 1); break;
            case 'b': wasp_buf_put(out, "\b", 1); break;
            case 'f': wasp_buf_put(out, "\f", 1); break;
            case 'n': wasp_buf_put(out, "\n", 1); break;
            case 'r': wasp_buf_put(out, "\r", 1); break;
            case 't': wasp_buf_put(out, "\t", 1); break;
            case 'u': {
                uint32_t cp;
                if (!hex4(p, &cp)) return parse_error(p, "bad \\u escape"), false;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t low;
                    if (p->end - p->at < 6 || p->at[0] != '\\' || p->at[1] != 'u')
                        return parse_error(p, "lone surrogate in \\u escape"), false;
                    p->at += 2;
                    if (!hex4(p, &low) || low < 0xDC00 || low > 0xDFFF)
                        return parse_error(p, "lone surrogate in \\u escape"), false;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return parse_error(p, "lone surrogate in \\u escape"), false;
                }
                put_utf8(out, cp);
                break;
            }
            default: return parse_error(p, "bad escape"), false;
            }
            continue;
        }
        size_t n = utf8_length(p->at, (size_t)(p->end - p->at));
        if (!n) return parse_error(p, "invalid UTF-8 in string"), false;
        wasp_buf_put(out, p->at, n);
        p->at += n;
    }
    return parse_error(p, "unterminated string"), false;
}

static wasp_json_t *parse_value(parser_t *p, int depth);

static wasp_json_t *parse_container(parser_t *p, int depth, bool object) {
    wasp_json_t *v = new_value(object ? WASP_JSON_OBJECT : WASP_JSON_ARRAY);
    p->at++;
    skip_space(p);
    if (p->at < p->end && *p->at == (object ? '}' : ']')) {
        p->at++;
        return v;
    }
    for (;;) {
        skip_space(p);
        wasp_buf_t key = {0};
        if (object) {
            if (p->at >= p->end || *p->at != '"') goto fail_expected_key;
            if (!parse_string_raw(p, &key)) goto fail;
            skip_space(p);
            if (p->at >= p->end || *p->at != ':') {
                wasp_buf_free(&key);
                parse_error(p, "expected `:`");
                goto fail;
            }
            p->at++;
        }
        wasp_json_t *item = parse_value(p, depth + 1);
        if (!item) {
            wasp_buf_free(&key);
            goto fail;
        }
        v->items = xrealloc(v->items, (v->count + 1) * sizeof(*v->items));
        v->items[v->count] = item;
        if (object) {
            v->keys = xrealloc(v->keys, (v->count + 1) * sizeof(*v->keys));
            v->key_lengths = xrealloc(v->key_lengths, (v->count + 1) * sizeof(*v->key_lengths));
            v->keys[v->count] = key.data ? (char *)key.data : xstrndup("", 0);
            v->key_lengths[v->count] = key.length;
        }
        v->count++;
        skip_space(p);
        if (p->at < p->end && *p->at == ',') {
            p->at++;
            continue;
        }
        if (p->at < p->end && *p->at == (object ? '}' : ']')) {
            p->at++;
            return v;
        }
        parse_error(p, object ? "expected `,` or `}`" : "expected `,` or `]`");
        goto fail;
    }
fail_expected_key:
    parse_error(p, "expected a string key");
fail:
    wasp_json_free(v);
    return NULL;
}

static wasp_json_t *parse_number(parser_t *p) {
    const uint8_t *s = p->at;
    if (p->at < p->end && *p->at == '-') p->at++;
    if (p->at >= p->end) return parse_error(p, "bad number");
    if (*p->at == '0') p->at++;
    else if (*p->at >= '1' && *p->at <= '9') while (p->at < p->end && *p->at >= '0' && *p->at <= '9') p->at++;
    else return parse_error(p, "bad number");
    if (p->at < p->end && *p->at == '.') {
        p->at++;
        if (p->at >= p->end || *p->at < '0' || *p->at > '9') return parse_error(p, "bad number");
        while (p->at < p->end && *p->at >= '0' && *p->at <= '9') p->at++;
    }
    if (p->at < p->end && (*p->at == 'e' || *p->at == 'E')) {
        p->at++;
        if (p->at < p->end && (*p->at == '+' || *p->at == '-')) p->at++;
        if (p->at >= p->end || *p->at < '0' || *p->at > '9') return parse_error(p, "bad number");
        while (p->at < p->end && *p->at >= '0' && *p->at <= '9') p->at++;
    }
    char *text = xstrndup((const char *)s, (size_t)(p->at - s));
    wasp_json_t *v = new_value(WASP_JSON_NUMBER);
    v->number = strtod(text, NULL);
    free(text);
    return v;
}

static bool literal(parser_t *p, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(p->end - p->at) < n || memcmp(p->at, word, n) != 0) return false;
    p->at += n;
    return true;
}

static wasp_json_t *parse_value(parser_t *p, int depth) {
    if (depth > 128) return parse_error(p, "nested too deep");
    skip_space(p);
    if (p->at >= p->end) return parse_error(p, "unexpected end of input");
    switch (*p->at) {
    case '{': return parse_container(p, depth, true);
    case '[': return parse_container(p, depth, false);
    case '"': {
        wasp_buf_t s = {0};
        if (!parse_string_raw(p, &s)) {
            wasp_buf_free(&s);
            return NULL;
        }
        wasp_json_t *v = new_value(WASP_JSON_STRING);
        v->string = s.data ? (char *)s.data : xstrndup("", 0);
        v->length = s.length;
        return v;
    }
    case 't':
    case 'f': {
        bool truth = *p->at == 't';
        if (!literal(p, truth ? "true" : "false")) return parse_error(p, "expected a value");
        wasp_json_t *v = new_value(WASP_JSON_BOOL);
        v->boolean = truth;
        return v;
    }
    case 'n':
        if (!literal(p, "null")) return parse_error(p, "expected a value");
        return new_value(WASP_JSON_NULL);
    default:
        if (*p->at == '-' || (*p->at >= '0' && *p->at <= '9')) return parse_number(p);
        return parse_error(p, "expected a value");
    }
}

wasp_json_t *wasp_json_parse(const uint8_t *data, size_t length, char *message, size_t message_size) {
    parser_t p = {data, data + length, data, message, message_size, false};
    wasp_json_t *v = parse_value(&p, 0);
    if (!v) return NULL;
    skip_space(&p);
    if (p.at != p.end) {
        wasp_json_free(v);
        parse_error(&p, "trailing characters");
        return NULL;
    }
    return v;
}

const wasp_json_t *wasp_json_get(const wasp_json_t *value, const char *key) {
    if (!value || value->type != WASP_JSON_OBJECT) return NULL;
    size_t n = strlen(key);
    for (size_t i = 0; i < value->count; i++)
        if (value->key_lengths[i] == n && memcmp(value->keys[i], key, n) == 0) return value->items[i];
    return NULL;
}

void wasp_json_write(wasp_buf_t *buf, const wasp_json_t *value) {
    switch (value->type) {
    case WASP_JSON_NULL: wasp_buf_puts(buf, "null"); break;
    case WASP_JSON_BOOL: wasp_buf_puts(buf, value->boolean ? "true" : "false"); break;
    case WASP_JSON_NUMBER:
        if (value->number == floor(value->number) && fabs(value->number) < 9007199254740992.0)
            wasp_buf_printf(buf, "%lld", (long long)value->number);
        else
            wasp_buf_printf(buf, "%.17g", value->number);
        break;
    case WASP_JSON_STRING: wasp_buf_json_string(buf, value->string, value->length); break;
    case WASP_JSON_ARRAY:
    case WASP_JSON_OBJECT: {
        bool object = value->type == WASP_JSON_OBJECT;
        wasp_buf_put(buf, object ? "{" : "[", 1);
        for (size_t i = 0; i < value->count; i++) {
            if (i) wasp_buf_put(buf, ",", 1);
            if (object) {
                wasp_buf_json_string(buf, value->keys[i], value->key_lengths[i]);
                wasp_buf_put(buf, ":", 1);
            }
            wasp_json_write(buf, value->items[i]);
        }
        wasp_buf_put(buf, object ? "}" : "]", 1);
        break;
    }
    }
}

void wasp_json_free(wasp_json_t *value) {
    if (!value) return;
    for (size_t i = 0; i < value->count; i++) {
        wasp_json_free(value->items[i]);
        if (value->keys) free(value->keys[i]);
    }
    free(value->items);
    free(value->keys);
    free(value->key_lengths);
    free(value->string);
    free(value);
}

bool wasp_request_json(const wasp_request_t *request, wasp_json_t **out, wasp_error_t *error) {
    char message[160];
    *out = wasp_json_parse(request->body.ptr, request->body.len, message, sizeof message);
    if (!*out)
        return wasp_fail(error, WASP_BAD_REQUEST, NULL,
                         "request body is not valid JSON for this endpoint: %s", message);
    return true;
}

/* ---- Defaults for the calls a processor leaves out. ---- */

__attribute__((weak)) bool wasp_init(wasp_error_t *error) {
    (void)error;
    return true;
}

__attribute__((weak)) bool wasp_handle(const wasp_request_t *request, wasp_response_t *response,
                                       wasp_error_t *error) {
    (void)request, (void)response;
    return wasp_fail(error, WASP_UNSUPPORTED, NULL,
                     "this processor does not serve requests alone (handle)");
}

__attribute__((weak)) bool wasp_pre_process(const wasp_request_t *request, wasp_prepared_t *prepared,
                                            wasp_error_t *error) {
    (void)request, (void)prepared;
    return wasp_fail(error, WASP_UNSUPPORTED, NULL, "this processor does not pre-process (pre_process)");
}

__attribute__((weak)) bool wasp_post_process(const wasp_bytes_t *context,
                                             const wasp_model_output_t *output,
                                             wasp_response_t *response, wasp_error_t *error) {
    (void)context, (void)output, (void)response;
    return wasp_fail(error, WASP_UNSUPPORTED, NULL,
                     "this processor does not post-process (post_process)");
}

/* ---- The component's exports. ---- */

bool exports_wasp_processor_lifecycle_init(exports_wasp_processor_lifecycle_error_t *err) {
    return wasp_init(err);
}

bool exports_wasp_processor_handler_handle(exports_wasp_processor_handler_request_t *request,
                                           exports_wasp_processor_handler_response_t *ret,
                                           exports_wasp_processor_handler_error_t *err) {
    memset(ret, 0, sizeof(*ret));
    bool ok = wasp_handle(request, ret, err);
    wasp_processor_types_request_free(request);
    return ok;
}

bool exports_wasp_processor_transform_pre_process(exports_wasp_processor_transform_request_t *request,
                                                  exports_wasp_processor_transform_prepared_t *ret,
                                                  exports_wasp_processor_transform_error_t *err) {
    memset(ret, 0, sizeof(*ret));
    bool ok = wasp_pre_process(request, ret, err);
    wasp_processor_types_request_free(request);
    return ok;
}

bool exports_wasp_processor_transform_post_process(full_list_u8_t *context,
                                                   exports_wasp_processor_transform_model_output_t *output,
                                                   exports_wasp_processor_transform_response_t *ret,
                                                   exports_wasp_processor_transform_error_t *err) {
    memset(ret, 0, sizeof(*ret));
    bool ok = wasp_post_process(context, output, ret, err);
    full_list_u8_free(context);
    wasp_processor_types_model_output_free(output);
    return ok;
}

/*
 * Redacts personal data (e-mail addresses, phone numbers, payment card numbers, IPv4
 * addresses) from text: the C twin of `processors/pii-redact` (Rust), answering the same
 * requests with the same responses (`tests/conformance/pii-redact.json`).
 *
 * C has no regex engine in wasi-libc that knows `\b` or `\d`, so each detector is a
 * small scanner that finds exactly what the Rust version's regular expression finds
 * (leftmost-first, non-overlapping). Limits: digits are ASCII digits, and a word
 * boundary next to a non-ASCII character treats letters and ideographs as word
 * characters and the punctuation, symbol and emoji blocks as not (Rust uses the Unicode
 * tables; the JavaScript version makes the same approximation).
 *
 * Configuration: REDACT_KINDS (comma-separated, default all four) and REDACT_MASK
 * (default `[{KIND}]`).
 */
#include <stdlib.h>
#include <string.h>

#include "wasp.h"

enum { EMAIL, CARD, IPV4, PHONE, KINDS };
static const char *const NAMES[KINDS] = {"email", "card", "ipv4", "phone"};
static const char *const UPPER[KINDS] = {"EMAIL", "CARD", "IPV4", "PHONE"};

typedef struct {
    int kind;
    size_t start, end;
} finding_t;

typedef struct {
    finding_t *items;
    size_t count;
} findings_t;

static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static bool is_alpha(unsigned char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

/* The code point whose UTF-8 encoding ends just before `at` / starts at `at`. */
static unsigned decode_at(const unsigned char *s, size_t n, size_t at) {
    unsigned char c = s[at];
    if (c < 0x80) return c;
    size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    unsigned cp = c & (len == 4 ? 0x07 : len == 3 ? 0x0F : 0x1F);
    for (size_t i = 1; i < len && at + i < n; i++) cp = (cp << 6) | (s[at + i] & 63);
    return cp;
}

static unsigned decode_before(const unsigned char *s, size_t n, size_t at) {
    size_t i = at - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    return decode_at(s, n, i);
}

static bool word_cp(unsigned cp) {
    if (cp < 0x80) return is_alpha((unsigned char)cp) || is_digit((unsigned char)cp) || cp == '_';
    if (cp < 0xC0) return cp == 0xAA || cp == 0xB5 || cp == 0xBA;
    if (cp == 0xD7 || cp == 0xF7) return false;
    if (cp >= 0x2000 && cp <= 0x2BFF) return cp == 0x200C || cp == 0x200D;
    if (cp >= 0x3000 && cp <= 0x303F) return cp == 0x3005 || cp == 0x3006 || cp == 0x3007;
    if (cp >= 0xFE30 && cp <= 0xFE4F) return false;
    if (cp >= 0xFF00 && cp <= 0xFF0F) return false;
    if (cp >= 0x1F000 && cp <= 0x1FAFF) return false;
    return true;
}

/* Whether a word boundary (`\b`) lies at byte `at`. */
static bool boundary(const unsigned char *s, size_t n, size_t at) {
    bool before = at > 0 && word_cp(decode_before(s, n, at));
    bool after = at < n && word_cp(decode_at(s, n, at));
    return before != after;
}

static bool local_char(unsigned char c) {
    return is_alpha(c) || is_digit(c) || c == '.' || c == '_' || c == '%' || c == '+' || c == '-';
}

static bool domain_char(unsigned char c) { return is_alpha(c) || is_digit(c) || c == '-'; }

/* The end of `[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}` at `at`, or 0. */
static size_t email_domain(const unsigned char *s, size_t n, size_t at) {
    /* Labels: maximal runs of domain characters separated by single dots. */
    size_t starts[256], ends[256], k = 0, i = at;
    while (k < 256) {
        size_t b = i;
        while (i < n && domain_char(s[i])) i++;
        if (i == b) break;
        starts[k] = b;
        ends[k++] = i;
        if (i + 1 < n && s[i] == '.' && domain_char(s[i + 1])) i++;
        else break;
    }
    for (size_t j = k; j-- > 1;) { /* the last label that starts with two letters */
        size_t e = starts[j];
        while (e < ends[j] && is_alpha(s[e])) e++;
        if (e - starts[j] >= 2) return e;
    }
    return 0;
}

static bool next_email(const unsigned char *s, size_t n, size_t from, size_t *start, size_t *end) {
    for (size_t i = from; i < n;) {
        if (!local_char(s[i])) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < n && local_char(s[j])) j++;
        if (j < n && s[j] == '@') {
            size_t e = email_domain(s, n, j + 1);
            if (e) {
                *start = i, *end = e;
                return true;
            }
        }
        i = j + 1; /* every start in i..j fails the same way */
    }
    return false;
}

/* `\b\d(?:[ -]?\d){12,18}\b` */
static bool next_card(const unsigned char *s, size_t n, size_t from, size_t *start, size_t *end) {
    for (size_t i = from; i < n; i++) {
        if (!is_digit(s[i]) || !boundary(s, n, i)) continue;
        size_t ends[19], units = 0, at = i + 1;
        while (units < 18) {
            if (at + 1 < n && (s[at] == ' ' || s[at] == '-') && is_digit(s[at + 1])) at += 2;
            else if (at < n && is_digit(s[at])) at += 1;
            else break;
            ends[++units] = at;
        }
        for (size_t u = units; u >= 12 && u > 0; u--) {
            if (boundary(s, n, ends[u])) {
                *start = i, *end = ends[u];
                return true;
            }
        }
    }
    return false;
}

/* `\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b` */
static bool next_ipv4(const unsigned char *s, size_t n, size_t from, size_t *start, size_t *end) {
    for (size_t i = from; i < n; i++) {
        if (!is_digit(s[i]) || !boundary(s, n, i)) continue;
        size_t at = i;
        bool ok = true;
        for (int octet = 0; octet < 4 && ok; octet++) {
            size_t b = at;
            while (at < n && is_digit(s[at]) && at - b < 3) at++;
            if (at == b) ok = false;
            else if (octet < 3) {
                if (at < n && s[at] == '.') at++;
                else ok = false;
            } else if (!boundary(s, n, at)) {
                ok = false;
            }
        }
        if (ok) {
            *start = i, *end = at;
            return true;
        }
    }
    return false;
}

static bool phone_char(unsigned char c) {
    return is_digit(c) || c == ' ' || c == '(' || c == ')' || c == '.' || c == '-';
}

/* `(?:\+|\b)\d[\d ().-]{7,}\d\b` */
static bool next_phone(const unsigned char *s, size_t n, size_t from, size_t *start, size_t *end) {
    for (size_t i = from; i < n; i++) {
        size_t first;
        if (s[i] == '+' && i + 1 < n && is_digit(s[i + 1])) first = i + 1;
        else if (is_digit(s[i]) && boundary(s, n, i)) first = i;
        else continue;
        size_t run = first + 1;
        while (run < n && phone_char(s[run])) run++;
        /* The last digit sits at e - 1, with at least 7 run characters before it. */
        for (size_t e = run; e >= first + 9; e--) {
            if (is_digit(s[e - 1]) && boundary(s, n, e)) {
                *start = i, *end = e;
                return true;
            }
        }
    }
    return false;
}

static size_t count_digits(const unsigned char *s, size_t a, size_t b) {
    size_t d = 0;
    for (size_t i = a; i < b; i++) d += is_digit(s[i]);
    return d;
}

static bool luhn(const unsigned char *s, size_t a, size_t b) {
    unsigned sum = 0, i = 0;
    for (size_t at = b; at-- > a;) {
        if (!is_digit(s[at])) continue;
        unsigned d = s[at] - '0';
        if (i++ % 2 == 1) {
            d *= 2;
            if (d > 9) d -= 9;
        }
        sum += d;
    }
    return sum % 10 == 0;
}

static bool valid(int kind, const unsigned char *s, size_t a, size_t b) {
    if (kind == CARD) return luhn(s, a, b);
    if (kind == PHONE) {
        size_t d = count_digits(s, a, b);
        return d >= 9 && d <= 15;
    }
    if (kind == IPV4) {
        unsigned octet = 0;
        for (size_t i = a; i <= b; i++) {
            if (i == b || s[i] == '.') {
                if (octet > 255) return false;
                octet = 0;
            } else {
                octet = octet * 10 + (s[i] - '0');
            }
        }
    }
    return true;
}

static int by_start(const void *x, const void *y) {
    const finding_t *a = x, *b = y;
    return a->start < b->start ? -1 : a->start > b->start;
}

/* Findings of the enabled kinds, without overlaps (earlier kinds win), by position. */
static findings_t find(const unsigned char *s, size_t n, const bool kinds[KINDS]) {
    typedef bool (*scanner_t)(const unsigned char *, size_t, size_t, size_t *, size_t *);
    static const scanner_t scanners[KINDS] = {next_email, next_card, next_ipv4, next_phone};
    findings_t found = {0};
    for (int kind = 0; kind < KINDS; kind++) {
        if (!kinds[kind]) continue;
        size_t at = 0, a, b;
        while (at <= n && scanners[kind](s, n, at, &a, &b)) {
            bool overlaps = false;
            for (size_t f = 0; f < found.count && !overlaps; f++)
                overlaps = a < found.items[f].end && found.items[f].start < b;
            if (valid(kind, s, a, b) && !overlaps) {
                found.items = realloc(found.items, (found.count + 1) * sizeof(finding_t));
                if (!found.items) abort();
                found.items[found.count++] = (finding_t){kind, a, b};
            }
            at = b;
        }
    }
    if (found.count) qsort(found.items, found.count, sizeof(finding_t), by_start);
    return found;
}

static bool default_kinds[KINDS];
static char *mask;

static void write_redacted(wasp_buf_t *out, const char *s, const findings_t *f) {
    size_t at = 0;
    for (size_t i = 0; i < f->count; i++) {
        wasp_buf_put(out, s + at, f->items[i].start - at);
        for (const char *m = mask; *m;) {
            if (strncmp(m, "{KIND}", 6) == 0) {
                wasp_buf_puts(out, UPPER[f->items[i].kind]);
                m += 6;
            } else {
                wasp_buf_put(out, m++, 1);
            }
        }
        at = f->items[i].end;
    }
}

/* Appends `{"text": ..., "findings": [...]}` for one text. */
static void redact_one(wasp_buf_t *out, const char *s, size_t n, const bool kinds[KINDS]) {
    findings_t f = find((const unsigned char *)s, n, kinds);
    wasp_buf_t text = {0};
    write_redacted(&text, s, &f);
    size_t tail = f.count ? f.items[f.count - 1].end : 0;
    wasp_buf_put(&text, s + tail, n - tail);
    wasp_buf_puts(out, "{\"text\":");
    wasp_buf_json_string(out, text.data ? (const char *)text.data : "", text.length);
    wasp_buf_puts(out, ",\"findings\":[");
    for (size_t i = 0; i < f.count; i++)
        wasp_buf_printf(out, "%s{\"kind\":\"%s\",\"start\":%zu,\"end\":%zu}", i ? "," : "",
                        NAMES[f.items[i].kind], f.items[i].start, f.items[i].end);
    wasp_buf_puts(out, "]}");
    wasp_buf_free(&text);
    free(f.items);
}

/* Redacts every string inside a parsed JSON value in place (keys excepted). */
static void redact_json(wasp_json_t *v, const bool kinds[KINDS]) {
    if (v->type == WASP_JSON_STRING) {
        findings_t f = find((const unsigned char *)v->string, v->length, kinds);
        if (f.count) {
            wasp_buf_t text = {0};
            write_redacted(&text, v->string, &f);
            size_t tail = f.items[f.count - 1].end;
            wasp_buf_put(&text, v->string + tail, v->length - tail);
            wasp_buf_put(&text, "", 1);
            free(v->string);
            v->string = (char *)text.data;
            v->length = text.length - 1;
        }
        free(f.items);
    } else {
        for (size_t i = 0; i < v->count; i++) redact_json(v->items[i], kinds);
    }
}

static int kind_named(const char *name, size_t n) {
    for (int k = 0; k < KINDS; k++)
        if (strlen(NAMES[k]) == n && memcmp(NAMES[k], name, n) == 0) return k;
    return -1;
}

bool wasp_init(wasp_error_t *error) {
    char *listed = wasp_config_get("REDACT_KINDS");
    for (int k = 0; k < KINDS; k++) default_kinds[k] = listed == NULL;
    if (listed) {
        for (char *item = listed; item;) {
            char *comma = strchr(item, ',');
            char *stop = comma ? comma : item + strlen(item);
            while (item < stop && (*item == ' ' || *item == '\t' || *item == '\n' || *item == '\r')) item++;
            while (stop > item && (stop[-1] == ' ' || stop[-1] == '\t' || stop[-1] == '\n' || stop[-1] == '\r')) stop--;
            if (stop > item) {
                int k = kind_named(item, (size_t)(stop - item));
                if (k < 0) {
                    bool failed = wasp_fail(error, WASP_INTERNAL, NULL,
                                            "REDACT_KINDS: unknown kind `%.*s` (email, card, ipv4, phone)",
                                            (int)(stop - item), item);
                    free(listed);
                    return failed;
                }
                default_kinds[k] = true;
            }
            item = comma ? comma + 1 : NULL;
        }
        free(listed);
    }
    mask = wasp_config_get("REDACT_MASK");
    if (!mask) mask = strdup("[{KIND}]");
    return true;
}

static bool is_string_list(const wasp_json_t *v) {
    if (v->type != WASP_JSON_ARRAY) return false;
    for (size_t i = 0; i < v->count; i++)
        if (v->items[i]->type != WASP_JSON_STRING) return false;
    return true;
}

/* A member that is absent or null counts as not given, as in the Rust version. */
static const wasp_json_t *given(const wasp_json_t *body, const char *key) {
    const wasp_json_t *v = wasp_json_get(body, key);
    return v && v->type != WASP_JSON_NULL ? v : NULL;
}

static bool handle_body(const wasp_json_t *body, wasp_response_t *response, wasp_error_t *error) {
    static const char *const prefix = "request body is not valid JSON for this endpoint";
    if (body->type != WASP_JSON_OBJECT)
        return wasp_fail(error, WASP_BAD_REQUEST, NULL, "%s: expected an object", prefix);
    for (size_t i = 0; i < body->count; i++) {
        const char *key = body->keys[i];
        if (strcmp(key, "text") && strcmp(key, "texts") && strcmp(key, "kinds"))
            return wasp_fail(error, WASP_BAD_REQUEST, NULL,
                             "%s: unknown field `%s`, expected one of `text`, `texts`, `kinds`",
                             prefix, key);
    }
    const wasp_json_t *text = given(body, "text"), *texts = given(body, "texts"),
                      *kinds = given(body, "kinds");
    if (text && text->type != WASP_JSON_STRING)
        return wasp_fail(error, WASP_BAD_REQUEST, NULL, "%s: `text` must be a string", prefix);
    if (texts && !is_string_list(texts))
        return wasp_fail(error, WASP_BAD_REQUEST, NULL, "%s: `texts` must be a list of strings", prefix);
    if (kinds && !is_string_list(kinds))
        return wasp_fail(error, WASP_BAD_REQUEST, NULL, "%s: `kinds` must be a list of strings", prefix);
    bool chosen[KINDS];
    memcpy(chosen, default_kinds, sizeof chosen);
    if (kinds) {
        memset(chosen, 0, sizeof chosen);
        for (size_t i = 0; i < kinds->count; i++) {
            const wasp_json_t *name = kinds->items[i];
            int k = kind_named(name->string, name->length);
            if (k < 0)
                return wasp_fail(error, WASP_BAD_REQUEST, "kinds",
                                 "unknown kind `%s` (email, card, ipv4, phone)", name->string);
            chosen[k] = true;
        }
    }
    if ((text != NULL) == (texts != NULL))
        return wasp_fail(error, WASP_BAD_REQUEST, "text", "give exactly one of `text` or `texts`");
    wasp_buf_t out = {0};
    if (text) {
        redact_one(&out, text->string, text->length, chosen);
    } else {
        wasp_buf_puts(&out, "{\"results\":[");
        for (size_t i = 0; i < texts->count; i++) {
            if (i) wasp_buf_puts(&out, ",");
            redact_one(&out, texts->items[i]->string, texts->items[i]->length, chosen);
        }
        wasp_buf_puts(&out, "]}");
    }
    wasp_response_json(response, 200, &out);
    return true;
}

bool wasp_handle(const wasp_request_t *request, wasp_response_t *response, wasp_error_t *error) {
    wasp_json_t *body;
    if (!wasp_request_json(request, &body, error)) return false;
    bool ok = handle_body(body, response, error);
    wasp_json_free(body);
    return ok;
}

bool wasp_pre_process(const wasp_request_t *request, wasp_prepared_t *prepared, wasp_error_t *error) {
    wasp_json_t *body;
    if (!wasp_request_json(request, &body, error)) return false;
    redact_json(body, default_kinds);
    wasp_buf_t out = {0};
    wasp_json_write(&out, body);
    wasp_json_free(body);
    prepared->input.parameters.is_some = true;
    prepared->input.parameters.val.ptr = out.data;
    prepared->input.parameters.val.len = out.length;
    return true;
}

bool wasp_post_process(const wasp_bytes_t *context, const wasp_model_output_t *output,
                       wasp_response_t *response, wasp_error_t *error) {
    (void)context;
    wasp_buf_t out = {0};
    if (output->metadata.is_some) {
        char message[160];
        wasp_json_t *body = wasp_json_parse(output->metadata.val.ptr, output->metadata.val.len,
                                            message, sizeof message);
        if (!body) return wasp_fail(error, WASP_INTERNAL, NULL, "model metadata is not JSON: %s", message);
        redact_json(body, default_kinds);
        wasp_json_write(&out, body);
        wasp_json_free(body);
    } else {
        wasp_buf_puts(&out, "null");
    }
    wasp_response_json(response, 200, &out);
    return true;
}

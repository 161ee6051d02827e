/*
 * Write wasp processors in C.
 *
 * A processor is a Wasm component behind the `wasp:processor` WIT contract (`wit/`).
 * `wit-bindgen c` generates the bindings (`full.h`) from those files at build time; this
 * header wraps them the way the Rust SDK does. Implement the calls you need; the ones you
 * leave out answer `unsupported` (HTTP 501):
 *
 *     #include "wasp.h"
 *
 *     bool wasp_handle(const wasp_request_t *request, wasp_response_t *response,
 *                      wasp_error_t *error) {
 *         wasp_json_t *body = NULL;
 *         if (!wasp_request_json(request, &body, error)) return false;
 *         const wasp_json_t *name = wasp_json_get(body, "name");
 *         if (!name || name->type != WASP_JSON_STRING) {
 *             wasp_json_free(body);
 *             return wasp_fail(error, WASP_BAD_REQUEST, "name", "`name` must be a string");
 *         }
 *         wasp_buf_t out = {0};
 *         wasp_buf_puts(&out, "{\"greeting\":");
 *         ... wasp_buf_json_string(&out, name->string, name->length) ...
 *         wasp_response_json(response, 200, &out);
 *         wasp_json_free(body);
 *         return true;
 *     }
 *
 * Every call returns true on success, or false after filling `error` (use wasp_fail).
 * Memory handed to the host (response bodies, headers, error messages) must come from
 * malloc; the helpers here do that, and the host's glue frees it after the call. The
 * request passed to a call is freed by the SDK when the call returns.
 *
 * Build with `wasp processor build` (clang for wasm32-wasi, then `wasm-tools component
 * new` with the WASI preview1 reactor adapter).
 */
#ifndef WASP_H
#define WASP_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "full.h"

/** A request as it reached the gateway: method, path, headers, body. */
typedef wasp_processor_types_request_t wasp_request_t;
/** A response: status, headers, body. */
typedef wasp_processor_types_response_t wasp_response_t;
/** An error value: code, message, optional field. */
typedef wasp_processor_types_error_t wasp_error_t;
/** What pre-processing returns: the model input and an opaque context. */
typedef wasp_processor_types_prepared_t wasp_prepared_t;
/** One model output chunk. */
typedef wasp_processor_types_model_output_t wasp_model_output_t;
/** A byte list (a post-process context). */
typedef full_list_u8_t wasp_bytes_t;

/** Error codes, and the HTTP status each gives the client. */
typedef enum {
    WASP_BAD_REQUEST = WASP_PROCESSOR_TYPES_ERROR_CODE_BAD_REQUEST,     /* 400 */
    WASP_FORBIDDEN = WASP_PROCESSOR_TYPES_ERROR_CODE_FORBIDDEN,         /* 403 */
    WASP_NOT_FOUND = WASP_PROCESSOR_TYPES_ERROR_CODE_NOT_FOUND,         /* 404 */
    WASP_TOO_LARGE = WASP_PROCESSOR_TYPES_ERROR_CODE_TOO_LARGE,         /* 413 */
    WASP_UNPROCESSABLE = WASP_PROCESSOR_TYPES_ERROR_CODE_UNPROCESSABLE, /* 422 */
    WASP_UNSUPPORTED = WASP_PROCESSOR_TYPES_ERROR_CODE_UNSUPPORTED,     /* 501 */
    WASP_UNAVAILABLE = WASP_PROCESSOR_TYPES_ERROR_CODE_UNAVAILABLE,     /* 503 */
    WASP_INTERNAL = WASP_PROCESSOR_TYPES_ERROR_CODE_INTERNAL,           /* 500 */
} wasp_error_code_t;

/* ---- The calls a processor implements (weak defaults answer `unsupported`). ---- */

/** Runs once per instance before its first call. */
bool wasp_init(wasp_error_t *error);
/** Answers a request alone (backend `none`). */
bool wasp_handle(const wasp_request_t *request, wasp_response_t *response, wasp_error_t *error);
/** Turns a request into model input plus a context for post-processing. */
bool wasp_pre_process(const wasp_request_t *request, wasp_prepared_t *prepared,
                      wasp_error_t *error);
/** Turns one model output chunk into a response chunk. */
bool wasp_post_process(const wasp_bytes_t *context, const wasp_model_output_t *output,
                       wasp_response_t *response, wasp_error_t *error);

/* ---- Errors, requests, responses. ---- */

/** Fills `error` (message formatted printf-style; `field` may be NULL) and returns false. */
bool wasp_fail(wasp_error_t *error, wasp_error_code_t code, const char *field,
               const char *format, ...) __attribute__((format(printf, 4, 5)));

/** The first value of header `name` (case-insensitive) and its length, or NULL. */
const char *wasp_request_header(const wasp_request_t *request, const char *name, size_t *length);

/** A growable byte buffer (zero-initialise it); its memory comes from malloc. */
typedef struct {
    uint8_t *data;
    size_t length;
    size_t capacity;
} wasp_buf_t;

/** Appends bytes. */
void wasp_buf_put(wasp_buf_t *buf, const void *data, size_t length);
/** Appends a NUL-terminated string. */
void wasp_buf_puts(wasp_buf_t *buf, const char *text);
/** Appends printf-formatted text. */
void wasp_buf_printf(wasp_buf_t *buf, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
/** Appends `text` (UTF-8, `length` bytes) as a quoted JSON string. */
void wasp_buf_json_string(wasp_buf_t *buf, const char *text, size_t length);
/** Frees the buffer's memory. */
void wasp_buf_free(wasp_buf_t *buf);

/** Sets `response` to `status` with the given content type, taking over `body`'s memory. */
void wasp_response_take(wasp_response_t *response, uint16_t status, const char *content_type,
                        wasp_buf_t *body);
/** A JSON response (takes over `body`). */
void wasp_response_json(wasp_response_t *response, uint16_t status, wasp_buf_t *body);
/** A plain-text response (copies `text`). */
void wasp_response_text(wasp_response_t *response, uint16_t status, const char *text);
/** Adds a header (copies both). */
void wasp_response_add_header(wasp_response_t *response, const char *name, const char *value);

/* ---- Host imports. ---- */

/** Log levels. */
typedef enum {
    WASP_LOG_TRACE = WASP_PROCESSOR_LOG_LEVEL_TRACE,
    WASP_LOG_DEBUG = WASP_PROCESSOR_LOG_LEVEL_DEBUG,
    WASP_LOG_INFO = WASP_PROCESSOR_LOG_LEVEL_INFO,
    WASP_LOG_WARN = WASP_PROCESSOR_LOG_LEVEL_WARN,
    WASP_LOG_ERROR = WASP_PROCESSOR_LOG_LEVEL_ERROR,
} wasp_log_level_t;

/** Writes a printf-formatted record to the endpoint's log. */
void wasp_log(wasp_log_level_t level, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/** The version's configuration value `key` as a malloc'd NUL-terminated string (free
 *  it), or NULL when the spec does not set it. */
char *wasp_config_get(const char *key);

/* ---- JSON. ---- */

/** A JSON value's type. */
typedef enum {
    WASP_JSON_NULL,
    WASP_JSON_BOOL,
    WASP_JSON_NUMBER,
    WASP_JSON_STRING,
    WASP_JSON_ARRAY,
    WASP_JSON_OBJECT,
} wasp_json_type_t;

/** A parsed JSON value. Strings are UTF-8 with escapes decoded (NUL-terminated, and
 *  `length` bytes long); an object's members keep their order (`keys[i]` names
 *  `items[i]`). */
typedef struct wasp_json {
    wasp_json_type_t type;
    bool boolean;
    double number;
    char *string;
    size_t length;
    struct wasp_json **items;
    char **keys;
    size_t *key_lengths;
    size_t count;
} wasp_json_t;

/** Parses `length` bytes of JSON (nested at most 128 deep). On failure returns NULL and
 *  writes a message (with the byte offset) into `message`. */
wasp_json_t *wasp_json_parse(const uint8_t *data, size_t length, char *message,
                             size_t message_size);
/** The member `key` of an object, or NULL (also when `value` is not an object). */
const wasp_json_t *wasp_json_get(const wasp_json_t *value, const char *key);
/** Writes `value` as compact JSON. */
void wasp_json_write(wasp_buf_t *buf, const wasp_json_t *value);
/** Frees a parsed value. */
void wasp_json_free(wasp_json_t *value);

/** Parses the request body as JSON; on failure fills a `bad-request` error and returns
 *  false. */
bool wasp_request_json(const wasp_request_t *request, wasp_json_t **out, wasp_error_t *error);

#endif

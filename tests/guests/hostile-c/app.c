/* A hostile C processor for the tests: each path misbehaves one way, and only that
 * request may fail (`runtime/cli/tests/languages.rs`). */
#include <stdlib.h>
#include <string.h>

#include "wasp.h"

static bool is(const wasp_request_t *request, const char *path) {
    size_t n = strlen(path);
    return request->path.len >= n && memcmp(request->path.ptr, path, n) == 0 &&
           (request->path.len == n || request->path.ptr[n] == '?');
}

bool wasp_handle(const wasp_request_t *request, wasp_response_t *response, wasp_error_t *error) {
    if (is(request, "/ok")) {
        wasp_response_text(response, 200, "ok");
        return true;
    }
    if (is(request, "/raise")) abort();
    if (is(request, "/loop")) {
        volatile unsigned long n = 0;
        for (;;) n++;
    }
    if (is(request, "/oom")) {
        /* Chained, so that the compiler cannot drop allocations nobody reads. */
        static void *volatile hoard;
        for (;;) {
            void **block = malloc(1 << 20);
            if (!block) abort();
            memset(block, 1, 1 << 20);
            *block = hoard;
            hoard = block;
        }
    }
    return wasp_fail(error, WASP_NOT_FOUND, NULL, "no such path");
}

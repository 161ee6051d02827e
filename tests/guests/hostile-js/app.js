// A hostile JavaScript processor for the tests: each path misbehaves one way, and only
// that request may fail (`runtime/cli/tests/languages.rs`).
import { processor, ProcessorError, Response } from './wasp.js';

export const { lifecycle, handler, transform } = processor({
  handle(request) {
    const path = request.path.split('?')[0];
    if (path === '/ok') return Response.text('ok');
    if (path === '/raise') throw new TypeError('thrown on purpose');
    if (path === '/loop') {
      for (;;) {}
    }
    if (path === '/oom') {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
    }
    throw ProcessorError.notFound(`no path ${path}`);
  },
});

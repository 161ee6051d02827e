// Write wasp processors in JavaScript.
//
// A processor is a Wasm component behind the `wasp:processor` WIT contract (`wit/`).
// componentize-js builds it from an ES module and generates the bindings from those same
// files; this module wraps them the way the Rust SDK does. Give `processor()` the calls
// you implement and export what it returns:
//
//     import { processor, Response, ProcessorError } from './wasp.js';
//
//     export const { lifecycle, handler, transform } = processor({
//       handle(request) {
//         const { name } = request.json();
//         if (typeof name !== 'string') {
//           throw ProcessorError.badRequest('`name` must be a string', 'name');
//         }
//         return Response.json({ greeting: `hello, ${name}` });
//       },
//     });
//
// Build it with `wasp processor build`. Calls you leave out answer `unsupported` (HTTP
// 501). A thrown value other than a ProcessorError answers `internal` (HTTP 500) with its
// message, and is logged with its stack; the instance keeps serving.

import { log as hostLog } from 'wasp:processor/log@0.1.0';
import { get as configGet, getAll as configGetAll } from 'wasp:processor/config@0.1.0';
import { infer as hostInfer } from 'wasp:processor/inference@0.1.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** The error codes of the contract, and the HTTP status each gives the client. */
export const ERROR_CODES = Object.freeze({
  'bad-request': 400,
  forbidden: 403,
  'not-found': 404,
  'too-large': 413,
  unprocessable: 422,
  unsupported: 501,
  unavailable: 503,
  internal: 500,
});

/** An error answered to the client; `code` (a key of ERROR_CODES) decides the status. */
export class ProcessorError extends Error {
  /**
   * @param {string} code one of ERROR_CODES' keys
   * @param {string} message for the client
   * @param {string} [field] the request field at fault
   */
  constructor(code, message, field) {
    if (!(code in ERROR_CODES)) {
      throw new TypeError(`unknown error code ${JSON.stringify(code)}`);
    }
    super(message);
    this.name = 'ProcessorError';
    this.code = code;
    this.field = field;
  }

  /** A malformed request (400). */
  static badRequest(message, field) {
    return new ProcessorError('bad-request', message, field);
  }

  /** A well-formed request that cannot be processed (422). */
  static unprocessable(message, field) {
    return new ProcessorError('unprocessable', message, field);
  }

  /** A request that is too large (413). */
  static tooLarge(message, field) {
    return new ProcessorError('too-large', message, field);
  }

  /** Something named in the request does not exist (404). */
  static notFound(message, field) {
    return new ProcessorError('not-found', message, field);
  }

  /** A call this processor does not implement (501). */
  static unsupported(message) {
    return new ProcessorError('unsupported', message);
  }

  /** A dependency is unavailable for now (503). */
  static unavailable(message) {
    return new ProcessorError('unavailable', message);
  }

  /** A failure inside the processor (500). */
  static internal(message) {
    return new ProcessorError('internal', message);
  }

  /** The contract's `error` record. */
  toWit() {
    return { code: this.code, message: this.message, field: this.field };
  }
}

/**
 * A request as it reached the gateway: `method`, `path` (below the endpoint's invoke
 * route, with the query), `headers` (`[name, value]` pairs, lower-case names), `body`
 * (a Uint8Array).
 */
export class Request {
  constructor({ method, path, headers, body }) {
    this.method = method;
    this.path = path;
    this.headers = headers;
    this.body = body;
  }

  /** The body parsed as JSON; a `bad-request` error naming the problem otherwise. */
  json() {
    try {
      return JSON.parse(decoder.decode(this.body));
    } catch (e) {
      throw ProcessorError.badRequest(
        `request body is not valid JSON for this endpoint: ${e.message}`,
      );
    }
  }

  /** The body as UTF-8 text; a `bad-request` error otherwise. */
  text() {
    try {
      return decoder.decode(this.body);
    } catch (e) {
      throw ProcessorError.badRequest(`request body is not UTF-8: ${e.message}`);
    }
  }

  /** The first value of header `name` (case-insensitive), or undefined. */
  header(name) {
    const lower = name.toLowerCase();
    const found = this.headers.find(([key]) => key.toLowerCase() === lower);
    return found ? found[1] : undefined;
  }
}

/** Builds the contract's `response` record. */
export const Response = Object.freeze({
  /** `value` as JSON. */
  json(value, status = 200, headers = []) {
    return Response.bytes('application/json', encoder.encode(JSON.stringify(value)), status, headers);
  },
  /** Plain text. */
  text(text, status = 200, headers = []) {
    return Response.bytes('text/plain; charset=utf-8', encoder.encode(text), status, headers);
  },
  /** A body of the given content type. */
  bytes(contentType, body, status = 200, headers = []) {
    return { status, headers: [['content-type', contentType], ...headers], body };
  },
});

const ARRAYS = {
  f32: Float32Array,
  f64: Float64Array,
  i64: BigInt64Array,
  i32: Int32Array,
  u32: Uint32Array,
  u8: Uint8Array,
};

/** Makes and reads the contract's `tensor` records (little-endian, row-major). */
export const Tensor = Object.freeze({
  /** A tensor of `values` (flat; bigints for i64) with element type `dtype` and `shape`. */
  new(name, dtype, shape, values) {
    const Array_ = ARRAYS[dtype];
    if (!Array_) throw ProcessorError.internal(`no JavaScript conversion for ${dtype}`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (values.length !== count) {
      throw ProcessorError.internal(`tensor \`${name}\`: ${values.length} values for shape [${shape}]`);
    }
    const typed = Array_.from(values);
    return {
      name,
      dtype,
      shape: shape.map(BigInt),
      data: new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength),
    };
  },
  /** A tensor of 32-bit floats. */
  f32(name, shape, values) {
    return Tensor.new(name, 'f32', shape, values);
  },
  /** A tensor of 64-bit integers (bigints). */
  i64(name, shape, values) {
    return Tensor.new(name, 'i64', shape, values.map(BigInt));
  },
  /** The elements as a typed array; an `internal` error if the bytes do not fit. */
  values(tensor) {
    const Array_ = ARRAYS[tensor.dtype];
    if (!Array_) throw ProcessorError.internal(`no JavaScript conversion for ${tensor.dtype}`);
    const count = tensor.shape.reduce((a, b) => a * Number(b), 1);
    if (tensor.data.byteLength !== count * Array_.BYTES_PER_ELEMENT) {
      throw ProcessorError.internal(
        `tensor \`${tensor.name}\` has ${tensor.data.byteLength} bytes for shape [${tensor.shape}]`,
      );
    }
    const copy = tensor.data.slice();
    return new Array_(copy.buffer, 0, count);
  },
});

/** Writing to the endpoint's log (`wasp logs`). */
export const log = Object.freeze({
  debug: (message) => hostLog('debug', message),
  info: (message) => hostLog('info', message),
  warn: (message) => hostLog('warn', message),
  error: (message) => hostLog('error', message),
});

/** The version's configuration (the `env` of its spec). */
export const config = Object.freeze({
  /** The value of `key`, or `fallback` when the spec does not set it. */
  get(key, fallback = undefined) {
    const value = configGet(key);
    return value === undefined || value === null ? fallback : value;
  },
  /** Every `[key, value]` the spec sets, sorted by key. */
  getAll() {
    return configGetAll();
  },
});

/**
 * Runs `input` (`{ tensors, parameters }`) through the tenant's endpoint `model` (its
 * backend only) and returns every output chunk; throws a ProcessorError when refused.
 */
export function infer(model, input) {
  try {
    return hostInfer(model, input);
  } catch (e) {
    const error = e && e.payload ? e.payload : e;
    if (error && typeof error.code === 'string') {
      throw new ProcessorError(error.code, error.message, error.field ?? undefined);
    }
    throw e;
  }
}

/** Runs one call, turning what it throws into the contract's error value. */
function run(name, fn, args) {
  try {
    return fn(...args);
  } catch (e) {
    if (e instanceof ProcessorError) throw e.toWit();
    const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    hostLog('error', `${name} threw ${e instanceof Error && e.stack ? `${what}\n${e.stack}` : what}`);
    throw { code: 'internal', message: `unhandled exception in ${name}: ${what}` };
  }
}

function missing(message) {
  return () => {
    throw ProcessorError.unsupported(message);
  };
}

/**
 * The component's exports (`lifecycle`, `handler`, `transform`) for the calls given:
 * `init()`, `handle(request)`, `preProcess(request)`, `postProcess(context, output)`.
 */
export function processor({ init, handle, preProcess, postProcess } = {}) {
  const handleFn = handle ?? missing('this processor does not serve requests alone (handle)');
  const preFn = preProcess ?? missing('this processor does not pre-process (pre_process)');
  const postFn = postProcess ?? missing('this processor does not post-process (post_process)');
  return {
    lifecycle: {
      init() {
        if (init) run('init', init, []);
      },
    },
    handler: {
      handle(request) {
        return run('handle', handleFn, [new Request(request)]);
      },
    },
    transform: {
      preProcess(request) {
        return run('pre_process', preFn, [new Request(request)]);
      },
      postProcess(context, output) {
        return run('post_process', postFn, [context, output]);
      },
    },
  };
}

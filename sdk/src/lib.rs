//! Write wasp processors in Rust.
//!
//! A processor is a Wasm component behind the `wasp:processor` WIT contract in `wit/`. This
//! crate generates the guest bindings from those same files and wraps them in one trait,
//! [`Processor`], plus helpers for JSON, tensors, logging, configuration and model calls.
//! Implement the methods you need and export the type:
//!
//! ```no_run
//! use wasp_sdk::{Error, Processor, Request, Response};
//!
//! struct Hello;
//!
//! impl Processor for Hello {
//!     fn handle(request: Request) -> Result<Response, Error> {
//!         #[derive(serde::Deserialize)]
//!         struct Input { name: String }
//!         let input: Input = request.json()?;
//!         Ok(Response::json(&serde_json::json!({ "greeting": format!("hello, {}", input.name) })))
//!     }
//! }
//!
//! wasp_sdk::processor!(Hello);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the `.wasm` file is the
//! component to name in an endpoint spec. Calls you leave unimplemented answer with an
//! `unsupported` error (HTTP 501).
#![deny(missing_docs)]

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bindings generated from `wit/` (the `full` world). Most users need only the re-exports
/// at the crate root.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "full",
        pub_export_macro: true,
        default_bindings_module: "wasp_sdk::bindings",
        export_macro_name: "export",
        generate_all,
    });
}

pub use bindings::wasp::processor::log::Level;
pub use bindings::wasp::processor::types::{
    Dtype, Error, ErrorCode, ModelInput, ModelOutput, Prepared, Request, Response, Tensor,
};

/// A processor. Every method has a default, so implement only what the processor does:
/// [`handle`](Processor::handle) for endpoints with backend `none`,
/// [`pre_process`](Processor::pre_process) and [`post_process`](Processor::post_process)
/// around a model. Processors are stateless between calls; put once-per-instance work
/// (parsing configuration, loading a vocabulary) in [`init`](Processor::init) and keep its
/// result in a `static` (`std::sync::OnceLock`).
pub trait Processor {
    /// Runs once per instance before its first call.
    fn init() -> Result<(), Error> {
        Ok(())
    }

    /// Answers a request alone (backend `none`).
    fn handle(request: Request) -> Result<Response, Error> {
        let _ = request;
        Err(Error::unsupported(
            "this processor does not serve requests alone (handle)",
        ))
    }

    /// Turns a request into model input plus a context for post-processing.
    fn pre_process(request: Request) -> Result<Prepared, Error> {
        let _ = request;
        Err(Error::unsupported(
            "this processor does not pre-process (pre_process)",
        ))
    }

    /// Turns one model output chunk into a response chunk.
    fn post_process(context: Vec<u8>, output: ModelOutput) -> Result<Response, Error> {
        let _ = (context, output);
        Err(Error::unsupported(
            "this processor does not post-process (post_process)",
        ))
    }
}

/// Exports a [`Processor`] implementation as the component's `wasp:processor` exports.
#[macro_export]
macro_rules! processor {
    ($ty:ty) => {
        const _: () = {
            struct __WaspExports;

            impl $crate::bindings::exports::wasp::processor::lifecycle::Guest for __WaspExports {
                fn init() -> ::core::result::Result<(), $crate::Error> {
                    <$ty as $crate::Processor>::init()
                }
            }

            impl $crate::bindings::exports::wasp::processor::handler::Guest for __WaspExports {
                fn handle(
                    request: $crate::Request,
                ) -> ::core::result::Result<$crate::Response, $crate::Error> {
                    <$ty as $crate::Processor>::handle(request)
                }
            }

            impl $crate::bindings::exports::wasp::processor::transform::Guest for __WaspExports {
                fn pre_process(
                    request: $crate::Request,
                ) -> ::core::result::Result<$crate::Prepared, $crate::Error> {
                    <$ty as $crate::Processor>::pre_process(request)
                }

                fn post_process(
                    context: ::std::vec::Vec<u8>,
                    output: $crate::ModelOutput,
                ) -> ::core::result::Result<$crate::Response, $crate::Error> {
                    <$ty as $crate::Processor>::post_process(context, output)
                }
            }

    $crate::bindings::export!(__WaspExports with_types_in $crate::bindings);
        };
    };
}

impl Error {
    /// An error of category `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// A well-formed request that cannot be processed (422).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unprocessable, message)
    }

    /// A request that is too large (413).
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// Something named in the request does not exist (404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// A call this processor does not implement (501).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }

    /// A failure inside the processor (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Names the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl Request {
    /// The body parsed as JSON; a `bad-request` error naming the problem otherwise.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::bad_request(format!(
                "request body is not valid JSON for this endpoint: {e}"
            ))
        })
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body)
            .map_err(|e| Error::bad_request(format!("request body is not UTF-8: {e}")))
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Response {
    /// A 200 response with `body` serialised as JSON.
    pub fn json<T: Serialize + ?Sized>(body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => Self::bytes("application/json", bytes),
            Err(e) => Self {
                status: 500,
                headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
                body: format!("cannot serialise response: {e}").into_bytes(),
            },
        }
    }

    /// A 200 plain-text response.
    pub fn text(body: impl Into<String>) -> Self {
        Self::bytes("text/plain; charset=utf-8", body.into().into_bytes())
    }

    /// A 200 response with the given content type.
    pub fn bytes(content_type: &str, body: Vec<u8>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    /// Sets the status code.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl Tensor {
    /// A tensor of `f32` values.
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data,
        }
    }

    /// A tensor of `i64` values.
    pub fn from_i64(name: impl Into<String>, shape: Vec<u64>, values: &[i64]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name: name.into(),
            dtype: Dtype::I64,
            shape,
            data,
        }
    }

    /// Number of elements the shape describes.
    pub fn len(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as `f32`; an error if the element type or byte length is wrong.
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        self.check(Dtype::F32, 4)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The elements as `i64`; an error if the element type or byte length is wrong.
    pub fn to_i64(&self) -> Result<Vec<i64>, Error> {
        self.check(Dtype::I64, 8)?;
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    fn check(&self, dtype: Dtype, size: usize) -> Result<(), Error> {
        if self.dtype != dtype {
            return Err(Error::internal(format!(
                "tensor `{}` is {:?}, not {dtype:?}",
                self.name, self.dtype
            )));
        }
        if self.data.len() != self.len() * size {
            return Err(Error::internal(format!(
                "tensor `{}` has {} bytes for shape {:?}",
                self.name,
                self.data.len(),
                self.shape
            )));
        }
        Ok(())
    }
}

/// Writing to the endpoint's log.
pub mod log {
    use crate::bindings::wasp::processor::log::{Level, log};

    /// Logs at `info`.
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Logs at `warn`.
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    /// Logs at `error`.
    pub fn error(message: &str) {
        log(Level::Error, message);
    }

    /// Logs at `debug`.
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
}

/// The version's configuration (the `env` of its spec).
pub mod config {
    /// The value of `key`, if set.
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::wasp::processor::config::get(key)
    }

    /// Every key and value, sorted by key.
    pub fn all() -> Vec<(String, String)> {
        crate::bindings::wasp::processor::config::get_all()
    }

    /// The value of `key` parsed as `T`, `default` when unset; an internal error naming
    /// the key when it does not parse.
    pub fn parse_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, crate::Error>
    where
        T::Err: std::fmt::Display,
    {
        match get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e| {
                crate::Error::internal(format!("configuration `{key}` = `{v}` is invalid: {e}"))
            }),
        }
    }
}

/// Runs `input` through the model of endpoint `model` (same tenant) and returns its output
/// chunks.
pub fn infer(model: &str, input: &ModelInput) -> Result<Vec<ModelOutput>, Error> {
    bindings::wasp::processor::inference::infer(model, input)
}

//! Host bindings generated from `wit/` (the `full` world: every import and export).

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "full",
    imports: { default: async },
    exports: { default: async },
});

pub use exports::wasp::processor::{handler, lifecycle, transform};
pub use wasp::processor::log::Level;
pub use wasp::processor::types::{
    Dtype, Error as GuestError, ErrorCode, ModelInput, ModelOutput, Prepared, Request, Response,
    Tensor,
};

impl GuestError {
    /// The message, with the field at fault when there is one.
    pub fn describe(&self) -> String {
        match &self.field {
            Some(field) => format!("{} (field `{field}`)", self.message),
            None => self.message.clone(),
        }
    }

    /// An error with no field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// The HTTP status this error stands for.
    pub fn status(&self) -> u16 {
        match self.code {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unprocessable => 422,
            ErrorCode::Unsupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

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

// Conversions to the engine-free types that backends use. Field by field, so that a change
// to the WIT records fails to compile here instead of drifting silently.

impl From<Dtype> for wasp_core::DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::Bf16 => Self::BF16,
            Dtype::F64 => Self::F64,
            Dtype::I64 => Self::I64,
            Dtype::I32 => Self::I32,
            Dtype::U32 => Self::U32,
            Dtype::U8 => Self::U8,
            Dtype::Boolean => Self::Bool,
        }
    }
}

impl From<wasp_core::DType> for Dtype {
    fn from(d: wasp_core::DType) -> Self {
        match d {
            wasp_core::DType::F32 => Self::F32,
            wasp_core::DType::F16 => Self::F16,
            wasp_core::DType::BF16 => Self::Bf16,
            wasp_core::DType::F64 => Self::F64,
            wasp_core::DType::I64 => Self::I64,
            wasp_core::DType::I32 => Self::I32,
            wasp_core::DType::U32 => Self::U32,
            wasp_core::DType::U8 => Self::U8,
            wasp_core::DType::Bool => Self::Boolean,
        }
    }
}

impl From<Tensor> for wasp_core::Tensor {
    fn from(t: Tensor) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype.into(),
            shape: t.shape,
            data: t.data,
        }
    }
}

impl From<wasp_core::Tensor> for Tensor {
    fn from(t: wasp_core::Tensor) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype.into(),
            shape: t.shape,
            data: t.data,
        }
    }
}

impl From<ModelInput> for wasp_core::ModelInput {
    fn from(i: ModelInput) -> Self {
        Self {
            tensors: i.tensors.into_iter().map(Into::into).collect(),
            parameters: i.parameters,
        }
    }
}

impl From<wasp_core::ModelInput> for ModelInput {
    fn from(i: wasp_core::ModelInput) -> Self {
        Self {
            tensors: i.tensors.into_iter().map(Into::into).collect(),
            parameters: i.parameters,
        }
    }
}

impl From<ModelOutput> for wasp_core::ModelOutput {
    fn from(o: ModelOutput) -> Self {
        Self {
            tensors: o.tensors.into_iter().map(Into::into).collect(),
            metadata: o.metadata,
            index: o.index,
            last: o.last,
        }
    }
}

impl From<wasp_core::ModelOutput> for ModelOutput {
    fn from(o: wasp_core::ModelOutput) -> Self {
        Self {
            tensors: o.tensors.into_iter().map(Into::into).collect(),
            metadata: o.metadata,
            index: o.index,
            last: o.last,
        }
    }
}

//! Tensors and model inputs and outputs as backends see them: plain Rust values, free of
//! any engine. The wasm runtime converts its WIT-generated types to and from these.

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 8-bit integer.
    U8,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8 | Self::Bool => 1,
        }
    }

    /// The KServe v2 name (`FP32`, `INT64`...).
    pub fn kserve_name(self) -> &'static str {
        match self {
            Self::F32 => "FP32",
            Self::F16 => "FP16",
            Self::BF16 => "BF16",
            Self::F64 => "FP64",
            Self::I64 => "INT64",
            Self::I32 => "INT32",
            Self::U32 => "UINT32",
            Self::U8 => "UINT8",
            Self::Bool => "BOOL",
        }
    }

    /// Parses a KServe v2 datatype name.
    pub fn from_kserve_name(name: &str) -> Option<Self> {
        [
            Self::F32,
            Self::F16,
            Self::BF16,
            Self::F64,
            Self::I64,
            Self::I32,
            Self::U32,
            Self::U8,
            Self::Bool,
        ]
        .into_iter()
        .find(|d| d.kserve_name() == name)
    }
}

/// A tensor is malformed or of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The data length does not match the shape.
    #[error("tensor `{name}`: {bytes} bytes do not hold shape {shape:?} of {dtype:?}")]
    Length {
        /// Tensor name.
        name: String,
        /// Its bytes.
        bytes: usize,
        /// Its shape.
        shape: Vec<u64>,
        /// Its element type.
        dtype: DType,
    },
    /// The element type is not the one asked for.
    #[error("tensor `{name}` is {actual:?}, expected {expected:?}")]
    DType {
        /// Tensor name.
        name: String,
        /// Its element type.
        actual: DType,
        /// The element type asked for.
        expected: DType,
    },
}

/// A named tensor: element type, shape, and little-endian row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name the model knows it by.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

macro_rules! typed {
    ($from:ident, $to:ident, $t:ty, $dtype:expr, $n:expr) => {
        /// A tensor of these values.
        pub fn $from(name: impl Into<String>, shape: Vec<u64>, values: &[$t]) -> Self {
            Self {
                name: name.into(),
                dtype: $dtype,
                shape,
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }
        }

        /// The elements, checking element type and length.
        pub fn $to(&self) -> Result<Vec<$t>, TensorError> {
            self.check($dtype)?;
            Ok(self
                .data
                .chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b)
                })
                .collect())
        }
    };
}

impl Tensor {
    typed!(from_f32, to_f32, f32, DType::F32, 4);
    typed!(from_i64, to_i64, i64, DType::I64, 8);
    typed!(from_i32, to_i32, i32, DType::I32, 4);

    /// Number of elements the shape describes (`usize::MAX` when that overflows, which no
    /// tensor's bytes can match).
    pub fn elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .unwrap_or(usize::MAX)
    }

    /// Bytes the shape and element type describe, if that fits a `usize`.
    pub fn byte_len(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size(), |n, &d| {
            n.checked_mul(usize::try_from(d).ok()?)
        })
    }

    /// Checks that the bytes match the shape.
    pub fn validate(&self) -> Result<(), TensorError> {
        if self.byte_len() != Some(self.data.len()) {
            return Err(TensorError::Length {
                name: self.name.clone(),
                bytes: self.data.len(),
                shape: self.shape.clone(),
                dtype: self.dtype,
            });
        }
        Ok(())
    }

    fn check(&self, dtype: DType) -> Result<(), TensorError> {
        if self.dtype != dtype {
            return Err(TensorError::DType {
                name: self.name.clone(),
                actual: self.dtype,
                expected: dtype,
            });
        }
        self.validate()
    }
}

/// What a model receives.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelInput {
    /// Input tensors.
    pub tensors: Vec<Tensor>,
    /// Backend parameters as a JSON object, if any.
    pub parameters: Option<String>,
}

impl ModelInput {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// One output chunk of a model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelOutput {
    /// Output tensors.
    pub tensors: Vec<Tensor>,
    /// Backend metadata as a JSON object, if any.
    pub metadata: Option<String>,
    /// Position in the stream, from 0.
    pub index: u32,
    /// Whether this is the final chunk.
    pub last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks() {
        let t = Tensor::from_i64("ids", vec![2, 2], &[1, -2, 3, 4]);
        assert_eq!(t.to_i64().unwrap(), [1, -2, 3, 4]);
        assert!(matches!(t.to_f32(), Err(TensorError::DType { .. })));
        let short = Tensor {
            data: vec![0; 3],
            ..Tensor::from_f32("x", vec![1], &[1.0])
        };
        assert!(matches!(short.validate(), Err(TensorError::Length { .. })));
        // A shape whose element count overflows matches no bytes (it wrapped to 0 before).
        let huge = Tensor {
            shape: vec![1 << 32, 1 << 32],
            ..Tensor::from_i64("ids", vec![0], &[])
        };
        assert!(matches!(huge.validate(), Err(TensorError::Length { .. })));
        assert!(matches!(huge.to_i64(), Err(TensorError::Length { .. })));
        assert_eq!(huge.elements(), usize::MAX);
        assert_eq!(DType::from_kserve_name("INT64"), Some(DType::I64));
        assert_eq!(DType::from_kserve_name("FLOAT"), None);
    }
}

//! Tensor elements in the KServe v2 (Open Inference Protocol) JSON encoding: the
//! little-endian bytes of a [`Tensor`] to and from JSON values. Shared by the gateway's
//! KServe routes and the container backend, which speaks the protocol to its containers.

use serde_json::{Value, json};

use crate::{DType, Tensor};

/// Why JSON data cannot become a tensor: the `datatype` or the `data` is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElementError {
    /// The datatype has no JSON encoding here (BYTES, FP16, or unknown).
    #[error("`{0}` is not supported here")]
    Datatype(String),
    /// The element count does not match the shape.
    #[error("{count} elements for shape {shape:?} ({expected} expected)")]
    Count {
        /// Elements found.
        count: usize,
        /// The shape given.
        shape: Vec<u64>,
        /// Elements the shape holds.
        expected: u64,
    },
    /// One element is not a value of the datatype.
    #[error("element {index} ({value}) is not a valid {datatype}")]
    Element {
        /// Its position in the flattened data.
        index: usize,
        /// The value.
        value: String,
        /// The datatype's KServe name.
        datatype: String,
    },
}

impl ElementError {
    /// The field of the KServe tensor object at fault: `datatype` or `data`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Datatype(_) => "datatype",
            Self::Count { .. } | Self::Element { .. } => "data",
        }
    }
}

/// A tensor from a KServe JSON tensor's parts; `data` may be flat or nested, row-major.
pub fn tensor_from_json(
    name: String,
    shape: Vec<u64>,
    datatype: &str,
    data: &Value,
) -> Result<Tensor, ElementError> {
    let dtype = DType::from_kserve_name(datatype)
        .filter(|d| !matches!(d, DType::F16 | DType::BF16))
        .ok_or_else(|| ElementError::Datatype(datatype.to_owned()))?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let expected = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    if expected != Some(flat.len() as u64) {
        return Err(ElementError::Count {
            count: flat.len(),
            expected: expected.unwrap_or(u64::MAX),
            shape,
        });
    }
    let mut bytes = Vec::with_capacity(flat.len() * dtype.size());
    for (index, value) in flat.iter().enumerate() {
        encode(value, dtype, &mut bytes).ok_or_else(|| ElementError::Element {
            index,
            value: value.to_string(),
            datatype: datatype.to_owned(),
        })?;
    }
    Ok(Tensor {
        name,
        dtype,
        shape,
        data: bytes,
    })
}

/// A tensor from a KServe tensor object (`{"name", "shape", "datatype", "data"}`); the
/// error is the field at fault (`name`, `shape`, `datatype`, `data`) and what is wrong.
pub fn tensor_from_object(object: &Value) -> Result<Tensor, (&'static str, String)> {
    let name = object["name"]
        .as_str()
        .ok_or(("name", "missing".to_owned()))?;
    let shape = object["shape"]
        .as_array()
        .and_then(|dims| dims.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .ok_or(("shape", "not a list of sizes".to_owned()))?;
    let datatype = object["datatype"]
        .as_str()
        .ok_or(("datatype", "missing".to_owned()))?;
    tensor_from_json(name.to_owned(), shape, datatype, &object["data"])
        .map_err(|e| (e.field(), e.to_string()))
}

/// A tensor as a KServe tensor object, its data flat (`None` for 16-bit floats).
pub fn tensor_object(tensor: &Tensor) -> Option<Value> {
    Some(json!({
        "name": tensor.name,
        "shape": tensor.shape,
        "datatype": tensor.dtype.kserve_name(),
        "data": tensor_to_json(tensor)?,
    }))
}

/// The JSON values of a tensor's elements, flat (16-bit floats and tensors whose bytes do
/// not fill their shape are not decoded: `None`).
pub fn tensor_to_json(tensor: &Tensor) -> Option<Vec<Value>> {
    let n = tensor.dtype.size();
    if tensor.byte_len() != Some(tensor.data.len()) {
        return None;
    }
    let chunks = tensor.data.chunks_exact(n);
    let arr = |c: &[u8]| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        b
    };
    Some(match tensor.dtype {
        DType::F32 => chunks
            .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F64 => chunks.map(|c| json!(f64::from_le_bytes(arr(c)))).collect(),
        DType::I64 => chunks.map(|c| json!(i64::from_le_bytes(arr(c)))).collect(),
        DType::I32 => chunks
            .map(|c| json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::U32 => chunks
            .map(|c| json!(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::U8 => chunks.map(|c| json!(c[0])).collect(),
        DType::Bool => chunks.map(|c| json!(c[0] != 0)).collect(),
        DType::F16 | DType::BF16 => return None,
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

fn encode(value: &Value, dtype: DType, out: &mut Vec<u8>) -> Option<()> {
    match dtype {
        DType::F32 => out.extend((value.as_f64()? as f32).to_le_bytes()),
        DType::F64 => out.extend(value.as_f64()?.to_le_bytes()),
        DType::I64 => out.extend(value.as_i64()?.to_le_bytes()),
        DType::I32 => out.extend(i32::try_from(value.as_i64()?).ok()?.to_le_bytes()),
        DType::U32 => out.extend(u32::try_from(value.as_u64()?).ok()?.to_le_bytes()),
        DType::U8 => out.push(u8::try_from(value.as_u64()?).ok()?),
        DType::Bool => out.push(match value {
            Value::Bool(b) => u8::from(*b),
            other => match other.as_u64()? {
                0 => 0,
                1 => 1,
                _ => return None,
            },
        }),
        DType::F16 | DType::BF16 => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_json_type() {
        for (datatype, data) in [
            ("FP32", json!([[0.5, -1.0], [2.0, 3.5]])),
            ("INT64", json!([1, -2, 3, 4])),
            ("UINT8", json!([0, 255, 7, 1])),
            ("BOOL", json!([true, false, true, true])),
        ] {
            let t = tensor_from_json("x".into(), vec![2, 2], datatype, &data).unwrap();
            let back = tensor_to_json(&t).unwrap();
            let flat: Vec<Value> = match &data {
                Value::Array(rows) if rows[0].is_array() => rows
                    .iter()
                    .flat_map(|r| r.as_array().unwrap().clone())
                    .collect(),
                Value::Array(items) => items.clone(),
                _ => unreachable!(),
            };
            assert_eq!(back, flat, "{datatype}");
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let e = tensor_from_json("x".into(), vec![3], "FP32", &json!([1, 2])).unwrap_err();
        assert_eq!(e.field(), "data");
        let e = tensor_from_json("x".into(), vec![1], "BYTES", &json!(["a"])).unwrap_err();
        assert_eq!(e.field(), "datatype");
        let e = tensor_from_json("x".into(), vec![1], "UINT8", &json!([300])).unwrap_err();
        assert!(e.to_string().contains("element 0"));
        // A shape whose product overflows is a count mismatch, not a panic.
        let e = tensor_from_json("x".into(), vec![u64::MAX, 2], "FP32", &json!([1])).unwrap_err();
        assert_eq!(e.field(), "data");
    }
}

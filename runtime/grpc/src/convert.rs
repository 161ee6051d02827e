//! Between the protocol's gRPC messages and its HTTP form with the binary tensor data
//! extension: a JSON header, then each tensor's raw little-endian bytes.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_response::InferOutputTensor;
use crate::proto::model_metadata_response::TensorMetadata;
use crate::proto::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataResponse,
};

/// A message that cannot be put in the HTTP form, and why (naming the field).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// An inference request in the HTTP form.
pub(crate) struct Encoded {
    /// The JSON header and the binary data after it.
    pub body: Bytes,
    /// The JSON header's length.
    pub header_length: usize,
}

/// Parameters as a JSON object.
fn parameters_json(
    parameters: &HashMap<String, InferParameter>,
    field: &str,
) -> Result<Map<String, Value>, Invalid> {
    let mut out = Map::new();
    // Sorted, so that the same request always makes the same header.
    let mut names: Vec<&String> = parameters.keys().collect();
    names.sort();
    for name in names {
        let value = match &parameters[name].parameter_choice {
            None => Value::Null,
            Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
            Some(ParameterChoice::Int64Param(i)) => json!(i),
            Some(ParameterChoice::Uint64Param(u)) => json!(u),
            Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
            Some(ParameterChoice::DoubleParam(d)) => serde_json::Number::from_f64(*d)
                .map(Value::Number)
                .ok_or_else(|| Invalid(format!("{field}.{name} is not a finite number")))?,
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// A JSON object's members as parameters (objects, arrays and null as their JSON text).
fn parameters_proto(value: Option<&Value>) -> HashMap<String, InferParameter> {
    let Some(Value::Object(map)) = value else {
        return HashMap::new();
    };
    map.iter()
        .map(|(name, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (None, None, f) => ParameterChoice::DoubleParam(f.unwrap_or(f64::NAN)),
                },
                other => ParameterChoice::StringParam(other.to_string()),
            };
            (
                name.clone(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect()
}

/// Typed contents as the raw bytes of `datatype`.
fn contents_raw(
    contents: &InferTensorContents,
    datatype: &str,
    field: &str,
) -> Result<Vec<u8>, Invalid> {
    let narrow = |what: &str| Invalid(format!("{field}: an element does not fit {what}"));
    let mut out = Vec::new();
    match datatype {
        "BOOL" => out.extend(contents.bool_contents.iter().map(|b| u8::from(*b))),
        "INT8" => {
            for v in &contents.int_contents {
                out.extend(i8::try_from(*v).map_err(|_| narrow("INT8"))?.to_le_bytes());
            }
        }
        "INT16" => {
            for v in &contents.int_contents {
                out.extend(
                    i16::try_from(*v)
                        .map_err(|_| narrow("INT16"))?
                        .to_le_bytes(),
                );
            }
        }
        "INT32" => out.extend(contents.int_contents.iter().flat_map(|v| v.to_le_bytes())),
        "INT64" => out.extend(contents.int64_contents.iter().flat_map(|v| v.to_le_bytes())),
        "UINT8" => {
            for v in &contents.uint_contents {
                out.extend(u8::try_from(*v).map_err(|_| narrow("UINT8"))?.to_le_bytes());
            }
        }
        "UINT16" => {
            for v in &contents.uint_contents {
                out.extend(
                    u16::try_from(*v)
                        .map_err(|_| narrow("UINT16"))?
                        .to_le_bytes(),
                );
            }
        }
        "UINT32" => out.extend(contents.uint_contents.iter().flat_map(|v| v.to_le_bytes())),
        "UINT64" => out.extend(
            contents
                .uint64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes()),
        ),
        "FP32" => out.extend(contents.fp32_contents.iter().flat_map(|v| v.to_le_bytes())),
        "FP64" => out.extend(contents.fp64_contents.iter().flat_map(|v| v.to_le_bytes())),
        "BYTES" => {
            for element in &contents.bytes_contents {
                let length = u32::try_from(element.len())
                    .map_err(|_| Invalid(format!("{field}: an element over 4 GiB")))?;
                out.extend(length.to_le_bytes());
                out.extend_from_slice(element);
            }
        }
        other => {
            return Err(Invalid(format!(
                "{field}: datatype `{other}` has no typed contents; send it in \
                 raw_input_contents"
            )));
        }
    }
    Ok(out)
}

/// The bytes of one element of a fixed-size datatype (`None` for `BYTES` and unknown
/// ones).
fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" | "FP16" | "BF16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Whether `bytes` bytes are what `shape` of a datatype of `size`-byte elements holds, as
/// Triton checks; the error names the tensor and where its data came from.
fn fits(
    shape: &[i64],
    size: usize,
    bytes: usize,
    datatype: &str,
    field: &str,
    source: &str,
) -> Result<(), Invalid> {
    let mut elements: usize = 1;
    for d in shape {
        let d = usize::try_from(*d)
            .map_err(|_| Invalid(format!("{field}.shape: a dimension is negative: {shape:?}")))?;
        elements = elements
            .checked_mul(d)
            .ok_or_else(|| Invalid(format!("{field}.shape: {shape:?} is too large")))?;
    }
    let needed = elements
        .checked_mul(size)
        .ok_or_else(|| Invalid(format!("{field}.shape: {shape:?} is too large")))?;
    if needed != bytes {
        return Err(Invalid(format!(
            "{field}: {source} has {bytes} bytes, but shape {shape:?} of {datatype} needs {needed}"
        )));
    }
    Ok(())
}

/// An inference request in the HTTP form: every input as binary data, every output asked
/// for in binary.
pub(crate) fn to_http(request: ModelInferRequest) -> Result<Encoded, Invalid> {
    let raw = !request.raw_input_contents.is_empty();
    if raw && request.raw_input_contents.len() != request.inputs.len() {
        return Err(Invalid(format!(
            "raw_input_contents has {} entries for {} inputs: give one per input",
            request.raw_input_contents.len(),
            request.inputs.len()
        )));
    }
    let mut data: Vec<Bytes> = Vec::with_capacity(request.inputs.len());
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let bytes = match (&input.contents, raw) {
            (Some(_), true) => {
                return Err(Invalid(format!(
                    "{field}.contents: the request has raw_input_contents too; give one form"
                )));
            }
            (Some(contents), false) => {
                Bytes::from(contents_raw(contents, &input.datatype, &field)?)
            }
            (None, true) => request.raw_input_contents[i].clone(),
            (None, false) => Bytes::new(),
        };
        if let Some(size) = element_size(&input.datatype) {
            let source = if raw {
                format!("raw_input_contents[{i}]")
            } else {
                format!("{field}.contents")
            };
            fits(
                &input.shape,
                size,
                bytes.len(),
                &input.datatype,
                &field,
                &source,
            )?;
        }
        let mut parameters = parameters_json(&input.parameters, &format!("{field}.parameters"))?;
        parameters.insert("binary_data_size".into(), json!(bytes.len()));
        inputs.push(json!({
            "name": input.name,
            "datatype": input.datatype,
            "shape": input.shape,
            "parameters": parameters,
        }));
        data.push(bytes);
    }
    let mut parameters = parameters_json(&request.parameters, "parameters")?;
    let mut header = Map::new();
    if !request.id.is_empty() {
        header.insert("id".into(), Value::String(request.id.clone()));
    }
    header.insert("inputs".into(), Value::Array(inputs));
    if request.outputs.is_empty() {
        parameters.insert("binary_data_output".into(), Value::Bool(true));
    } else {
        let mut outputs = Vec::with_capacity(request.outputs.len());
        for (i, output) in request.outputs.iter().enumerate() {
            let mut p = parameters_json(&output.parameters, &format!("outputs[{i}].parameters"))?;
            p.insert("binary_data".into(), Value::Bool(true));
            outputs.push(json!({ "name": output.name, "parameters": p }));
        }
        header.insert("outputs".into(), Value::Array(outputs));
    }
    header.insert("parameters".into(), Value::Object(parameters));
    let header = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Invalid(format!("cannot write the request: {e}")))?;
    let header_length = header.len();
    let mut body = Vec::with_capacity(header_length + data.iter().map(Bytes::len).sum::<usize>());
    body.extend_from_slice(&header);
    for d in &data {
        body.extend_from_slice(d);
    }
    Ok(Encoded {
        body: Bytes::from(body),
        header_length,
    })
}

/// JSON data (nested arrays flattened) as the raw bytes of `datatype`.
fn json_raw(data: &Value, datatype: &str, out: &mut Vec<u8>) -> Result<(), Invalid> {
    if let Value::Array(items) = data {
        for item in items {
            json_raw(item, datatype, out)?;
        }
        return Ok(());
    }
    let wrong = || Invalid(format!("an element `{data}` is not {datatype}"));
    let int = || data.as_i64().ok_or_else(wrong);
    let uint = || data.as_u64().ok_or_else(wrong);
    let float = || data.as_f64().ok_or_else(wrong);
    match datatype {
        "BOOL" => out.push(u8::from(data.as_bool().ok_or_else(wrong)?)),
        "INT8" => out.extend(i8::try_from(int()?).map_err(|_| wrong())?.to_le_bytes()),
        "INT16" => out.extend(i16::try_from(int()?).map_err(|_| wrong())?.to_le_bytes()),
        "INT32" => out.extend(i32::try_from(int()?).map_err(|_| wrong())?.to_le_bytes()),
        "INT64" => out.extend(int()?.to_le_bytes()),
        "UINT8" => out.extend(u8::try_from(uint()?).map_err(|_| wrong())?.to_le_bytes()),
        "UINT16" => out.extend(u16::try_from(uint()?).map_err(|_| wrong())?.to_le_bytes()),
        "UINT32" => out.extend(u32::try_from(uint()?).map_err(|_| wrong())?.to_le_bytes()),
        "UINT64" => out.extend(uint()?.to_le_bytes()),
        #[allow(clippy::cast_possible_truncation)]
        "FP32" => out.extend((float()? as f32).to_le_bytes()),
        "FP64" => out.extend(float()?.to_le_bytes()),
        "BYTES" => {
            let text = data.as_str().ok_or_else(wrong)?;
            let length = u32::try_from(text.len()).map_err(|_| wrong())?;
            out.extend(length.to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        _ => return Err(wrong()),
    }
    Ok(())
}

/// An HTTP inference answer (a JSON header of `header_length` bytes, or all of `body`,
/// then binary data) as the gRPC response, every output's data raw.
pub(crate) fn from_http(
    body: &Bytes,
    header_length: Option<usize>,
) -> Result<ModelInferResponse, Invalid> {
    let split = header_length.unwrap_or(body.len());
    if split > body.len() {
        return Err(Invalid(format!(
            "a header of {split} bytes in {} bytes",
            body.len()
        )));
    }
    let header: Value =
        serde_json::from_slice(&body[..split]).map_err(|e| Invalid(format!("not JSON: {e}")))?;
    let text = |key: &str| header[key].as_str().unwrap_or_default().to_owned();
    let mut offset = split;
    let mut outputs = Vec::new();
    let mut raw = Vec::new();
    for (i, output) in header["outputs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let datatype = output["datatype"].as_str().unwrap_or_default().to_owned();
        let mut parameters = output["parameters"].clone();
        let size = parameters
            .as_object_mut()
            .and_then(|p| p.remove("binary_data_size"))
            .and_then(|s| s.as_u64());
        let data = match size {
            Some(size) => {
                let end = usize::try_from(size)
                    .ok()
                    .and_then(|size| offset.checked_add(size))
                    .filter(|end| *end <= body.len())
                    .ok_or_else(|| Invalid(format!("outputs[{i}] runs past the answer")))?;
                let data = body.slice(offset..end);
                offset = end;
                data
            }
            None => {
                let mut out = Vec::new();
                json_raw(&output["data"], &datatype, &mut out)
                    .map_err(|e| Invalid(format!("outputs[{i}]: {}", e.0)))?;
                Bytes::from(out)
            }
        };
        raw.push(data);
        outputs.push(InferOutputTensor {
            name: output["name"].as_str().unwrap_or_default().to_owned(),
            datatype,
            shape: output["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
            parameters: parameters_proto(Some(&parameters)),
            contents: None,
        });
    }
    Ok(ModelInferResponse {
        model_name: text("model_name"),
        model_version: text("model_version"),
        id: text("id"),
        parameters: parameters_proto(header.get("parameters")),
        outputs,
        raw_output_contents: raw,
    })
}

/// A JSON array of strings.
pub(crate) fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn tensors(value: &Value) -> Vec<TensorMetadata> {
    value
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| TensorMetadata {
            name: t["name"].as_str().unwrap_or_default().to_owned(),
            datatype: t["datatype"].as_str().unwrap_or_default().to_owned(),
            shape: t["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// The HTTP route's model metadata as the gRPC message.
pub(crate) fn model_metadata(v: &Value) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: v["name"].as_str().unwrap_or_default().to_owned(),
        versions: strings(&v["versions"]),
        platform: v["platform"].as_str().unwrap_or_default().to_owned(),
        inputs: tensors(&v["inputs"]),
        outputs: tensors(&v["outputs"]),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    fn split(encoded: &Encoded) -> (Value, &[u8]) {
        let (head, rest) = encoded.body.split_at(encoded.header_length);
        (serde_json::from_slice(head).unwrap(), rest)
    }

    #[test]
    fn raw_inputs_become_binary_data_and_outputs_are_asked_for_in_binary() {
        let request = ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            inputs: vec![
                InferInputTensor {
                    name: "x".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "t".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_input_contents: vec![
                Bytes::from(
                    [1.0f32, 2.0]
                        .iter()
                        .flat_map(|f| f.to_le_bytes())
                        .collect::<Vec<_>>(),
                ),
                Bytes::from_static(b"\x02\0\0\0hi"),
            ],
            parameters: HashMap::from([(
                "priority".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(3)),
                },
            )]),
            ..Default::default()
        };
        let encoded = to_http(request).unwrap();
        let (header, data) = split(&encoded);
        assert_eq!(header["id"], "r1");
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(header["inputs"][1]["parameters"]["binary_data_size"], 6);
        assert_eq!(header["parameters"]["binary_data_output"], true);
        assert_eq!(header["parameters"]["priority"], 3);
        assert_eq!(data.len(), 14);
        assert_eq!(&data[8..], b"\x02\0\0\0hi");
    }

    #[test]
    fn typed_contents_become_raw_bytes_and_requested_outputs_binary() {
        let request = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "ids".into(),
                datatype: "INT64".into(),
                shape: vec![2],
                contents: Some(InferTensorContents {
                    int64_contents: vec![7, -1],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let encoded = to_http(request).unwrap();
        let (header, data) = split(&encoded);
        assert_eq!(header["outputs"][0]["parameters"]["binary_data"], true);
        assert!(header["parameters"].get("binary_data_output").is_none());
        assert_eq!(data, [7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat());
    }

    #[test]
    fn mixed_or_miscounted_input_forms_are_refused_naming_the_field() {
        let input = InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            contents: Some(InferTensorContents::default()),
            ..Default::default()
        };
        let both = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input.clone()],
            raw_input_contents: vec![Bytes::from_static(&[0, 0, 0, 0])],
            ..Default::default()
        };
        assert!(
            to_http(both)
                .err()
                .unwrap()
                .0
                .contains("inputs[0].contents")
        );
        let short = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input.clone(), input],
            raw_input_contents: vec![Bytes::new()],
            ..Default::default()
        };
        assert!(
            to_http(short)
                .err()
                .unwrap()
                .0
                .contains("1 entries for 2 inputs")
        );
        let mut short = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "ids".into(),
                datatype: "INT64".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(vec![0u8; 24])],
            ..Default::default()
        };
        let e = to_http(short.clone()).err().unwrap().0;
        assert!(
            e.contains(
                "inputs[0]: raw_input_contents[0] has 24 bytes, but shape [1, 4] of INT64 needs 32"
            ),
            "{e}"
        );
        short.inputs[0].shape = vec![1, -3];
        assert!(to_http(short).err().unwrap().0.contains("negative"));
        let narrow = InferTensorContents {
            int_contents: vec![300],
            ..Default::default()
        };
        let e = contents_raw(&narrow, "INT8", "inputs[0]").err().unwrap();
        assert!(e.0.contains("INT8"));
    }

    #[test]
    fn answers_come_back_raw_whether_binary_or_json() {
        let header = json!({
            "model_name": "m", "model_version": "v1", "id": "r1",
            "parameters": {"finish": "stop", "n": 2, "extra": {"a": 1}},
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
                {"name": "z", "datatype": "INT32", "shape": [1, 2], "data": [[1, 2]]},
            ],
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend([0.5f32, 1.5].iter().flat_map(|f| f.to_le_bytes()));
        let response = from_http(&Bytes::from(body), Some(header.len())).unwrap();
        assert_eq!(response.model_version, "v1");
        assert_eq!(response.id, "r1");
        assert_eq!(response.outputs[1].shape, vec![1, 2]);
        assert_eq!(
            response.raw_output_contents[0].as_ref(),
            [0.5f32.to_le_bytes(), 1.5f32.to_le_bytes()].concat()
        );
        assert_eq!(
            response.raw_output_contents[1].as_ref(),
            [1i32.to_le_bytes(), 2i32.to_le_bytes()].concat()
        );
        assert!(response.outputs[0].parameters.is_empty());
        assert_eq!(
            response.parameters["extra"].parameter_choice,
            Some(ParameterChoice::StringParam(r#"{"a":1}"#.into()))
        );
        let cut = r#"{"outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}"#;
        let short = Bytes::from(cut);
        assert!(from_http(&short, Some(cut.len())).is_err());
    }
}

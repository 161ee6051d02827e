//! The KServe v2 (Open Inference Protocol) encoding: inference requests in JSON or with
//! the binary tensor data extension to model input, and model output back, honouring the
//! requested outputs and how each asks to be sent.
//!
//! With the binary extension, the request's JSON header is the first
//! `Inference-Header-Content-Length` bytes of the body, and each input whose parameters
//! hold `binary_data_size` takes that many bytes, in order, from what follows: numbers as
//! their little-endian bytes, `BYTES` elements each as a 4-byte little-endian length and
//! the bytes. A response puts an output's data in the same binary form when the output
//! asks (`parameters.binary_data`) or the request does (`parameters.binary_data_output`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasp_core::kserve::{ElementError, tensor_from_json, tensor_to_json};
use wasp_core::{DType, ModelInput, ModelOutput, Tensor};

/// A request that does not fit the protocol, with the field at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    /// JSON path of the field (`inputs[0].data`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A KServe v2 (Open Inference Protocol) inference request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InferRequest {
    /// An id, echoed in the response.
    #[serde(default)]
    id: Option<String>,
    /// The input tensors.
    inputs: Vec<InputTensor>,
    /// Request parameters: `binary_data_output` asks for every output in binary form; the
    /// rest are passed on as the model input's metadata.
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// The outputs wanted, in order (default: every output the model gives).
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

/// One input tensor of a KServe v2 request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputTensor {
    /// Tensor name, as the model names its input.
    name: String,
    /// Dimensions.
    shape: Vec<u64>,
    /// `BOOL`, `UINT8`, `INT32`, `UINT32`, `INT64`, `FP16`/`BF16` (binary only), `FP32`,
    /// `FP64`, or `BYTES` (text, for an endpoint whose processor reads it).
    datatype: String,
    /// Elements, row-major, flat or nested; absent when the data is binary.
    #[serde(default)]
    data: Option<Value>,
    /// Tensor parameters: `binary_data_size` when the data is binary.
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// An output a request asks for.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestedOutput {
    /// The output's name.
    name: String,
    /// `binary_data: true` sends it in binary form.
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A KServe v2 inference response (the JSON part, with the binary extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct InferResponse {
    /// The endpoint.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's id, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The model output's metadata, when it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The output tensors.
    pub outputs: Vec<OutputTensor>,
}

/// One output tensor of a KServe v2 response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// `binary_data_size` when the data is in the binary part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Elements, row-major, flat (absent when binary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Value>>,
}

/// A tensor on its way in or out: numbers as little-endian bytes, or `BYTES` elements.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A numeric tensor.
    Numbers(Tensor),
    /// A `BYTES` tensor: its name, shape and elements.
    Bytes {
        /// Its name.
        name: String,
        /// Its dimensions.
        shape: Vec<u64>,
        /// Its elements.
        items: Vec<Vec<u8>>,
    },
}

impl Data {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Numbers(t) => &t.name,
            Self::Bytes { name, .. } => name,
        }
    }

    /// The tensor as a KServe JSON object (elements as JSON values; `BYTES` as strings).
    fn to_json(&self) -> Result<Value, String> {
        Ok(match self {
            Self::Numbers(t) => serde_json::json!({
                "name": t.name,
                "datatype": t.dtype.kserve_name(),
                "shape": t.shape,
                "data": tensor_to_json(t).ok_or_else(|| {
                    format!("`{}` ({}) has no JSON form", t.name, t.dtype.kserve_name())
                })?,
            }),
            Self::Bytes { name, shape, items } => serde_json::json!({
                "name": name,
                "datatype": "BYTES",
                "shape": shape,
                "data": items.iter().map(|b| String::from_utf8_lossy(b)).collect::<Vec<_>>(),
            }),
        })
    }
}

/// How outputs are to be sent.
#[derive(Debug, Clone, Default)]
pub struct OutputChoice {
    /// The outputs asked for, in order, each with its own binary choice.
    wanted: Option<Vec<(String, Option<bool>)>>,
    /// Whether outputs without their own choice go binary.
    binary: bool,
}

impl OutputChoice {
    /// The same outputs, every one in JSON (for a server-sent event stream).
    pub(crate) fn as_json(&self) -> Self {
        Self {
            wanted: self.wanted.as_ref().map(|w| {
                w.iter()
                    .map(|(name, _)| (name.clone(), Some(false)))
                    .collect()
            }),
            binary: false,
        }
    }
}

/// A parsed inference request.
pub struct Request {
    /// The request id, echoed in the response.
    pub id: Option<String>,
    /// The inputs, decoded.
    pub inputs: Vec<Data>,
    /// Request parameters to pass on (without the protocol's own).
    pub parameters: Option<Map<String, Value>>,
    /// How outputs are to be sent.
    pub outputs: OutputChoice,
}

impl Request {
    /// Whether an input is text (`BYTES`), which only a processor can read.
    pub fn has_text(&self) -> bool {
        self.inputs.iter().any(|d| matches!(d, Data::Bytes { .. }))
    }

    /// The model input for a backend (numeric inputs only: see [`Request::has_text`]),
    /// taking the inputs' data rather than copying it.
    pub fn take_model_input(&mut self) -> ModelInput {
        ModelInput {
            tensors: std::mem::take(&mut self.inputs)
                .into_iter()
                .filter_map(|d| match d {
                    Data::Numbers(t) => Some(t),
                    Data::Bytes { .. } => None,
                })
                .collect(),
            parameters: self
                .parameters
                .clone()
                .map(|p| Value::Object(p).to_string()),
        }
    }

    /// The request as plain KServe JSON (binary data decoded), for a processor to read.
    pub fn to_json(&self, model: &str) -> Result<Vec<u8>, Invalid> {
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, d)| d.to_json().map_err(|e| invalid(format!("inputs[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut body = serde_json::json!({ "model_name": model, "inputs": inputs });
        if let Some(id) = &self.id {
            body["id"] = Value::String(id.clone());
        }
        if let Some(p) = &self.parameters {
            body["parameters"] = Value::Object(p.clone());
        }
        serde_json::to_vec(&body).map_err(|e| invalid("body", e.to_string()))
    }
}

/// The elements of a shape, when the count fits.
fn count(shape: &[u64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
}

/// `BYTES` elements from their binary form (a 4-byte little-endian length before each).
fn split_bytes(mut raw: &[u8], expected: usize, field: &str) -> Result<Vec<Vec<u8>>, Invalid> {
    let mut items = Vec::with_capacity(expected.min(raw.len() / 4));
    while !raw.is_empty() {
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(invalid(field, "a BYTES element's length is cut short"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(invalid(
                field,
                format!("a BYTES element of {len} bytes runs past the data"),
            ));
        }
        items.push(rest[..len].to_vec());
        raw = &rest[len..];
    }
    if items.len() != expected {
        return Err(invalid(
            field,
            format!("{} BYTES elements for {expected} in the shape", items.len()),
        ));
    }
    Ok(items)
}

/// `BYTES` elements in their binary form.
fn join_bytes(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 4).sum());
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn flag(
    parameters: Option<&Map<String, Value>>,
    key: &str,
    field: &str,
) -> Result<Option<bool>, Invalid> {
    match parameters.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(
            field,
            format!("`{key}` must be true or false, not {other}"),
        )),
    }
}

/// Parses an inference request body: all JSON, or (with `header_length`, the
/// `Inference-Header-Content-Length`) a JSON header and binary tensor data.
pub fn parse(body: &[u8], header_length: Option<usize>) -> Result<Request, Invalid> {
    let (header, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(invalid(
                "Inference-Header-Content-Length",
                format!("{n} is more than the body's {} bytes", body.len()),
            ));
        }
    };
    let request: InferRequest = serde_json::from_slice(header)
        .map_err(|e| invalid("body", format!("not a KServe v2 inference request: {e}")))?;
    if request.inputs.is_empty() {
        return Err(invalid("inputs", "at least one input is required"));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.into_iter().enumerate() {
        let at = |part: &str| format!("inputs[{i}].{part}");
        let size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| invalid(at("parameters.binary_data_size"), "not a size"))?,
            ),
        };
        let elements = count(&input.shape).ok_or_else(|| {
            invalid(
                at("shape"),
                format!("{:?} holds too many elements", input.shape),
            )
        })?;
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    at("data"),
                    "both `data` and `parameters.binary_data_size`: give one",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    at("data"),
                    "missing (or give `parameters.binary_data_size`)",
                ));
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(invalid(
                        at("parameters.binary_data_size"),
                        format!("{n} bytes, but only {} are left in the body", binary.len()),
                    ));
                }
                let (raw, rest) = binary.split_at(n);
                binary = rest;
                if input.datatype == "BYTES" {
                    Data::Bytes {
                        items: split_bytes(raw, elements, &at("data"))?,
                        name: input.name,
                        shape: input.shape,
                    }
                } else {
                    let dtype = DType::from_kserve_name(&input.datatype).ok_or_else(|| {
                        invalid(
                            at("datatype"),
                            format!("`{}` is not a KServe datatype", input.datatype),
                        )
                    })?;
                    if elements.checked_mul(dtype.size()) != Some(raw.len()) {
                        return Err(invalid(
                            at("parameters.binary_data_size"),
                            format!(
                                "{} bytes for {elements} {} elements ({} expected)",
                                raw.len(),
                                input.datatype,
                                elements.saturating_mul(dtype.size())
                            ),
                        ));
                    }
                    Data::Numbers(Tensor {
                        name: input.name,
                        dtype,
                        shape: input.shape,
                        data: raw.to_vec(),
                    })
                }
            }
            (None, Some(data)) if input.datatype == "BYTES" => {
                let mut items = Vec::with_capacity(elements);
                collect_strings(&data, &mut items).map_err(|e| invalid(at("data"), e))?;
                if items.len() != elements {
                    return Err(invalid(
                        at("data"),
                        format!(
                            "{} elements for shape {:?} ({elements} expected)",
                            items.len(),
                            input.shape
                        ),
                    ));
                }
                Data::Bytes {
                    name: input.name,
                    shape: input.shape,
                    items,
                }
            }
            (None, Some(data)) => Data::Numbers(
                tensor_from_json(input.name, input.shape, &input.datatype, &data).map_err(|e| {
                    let field = at(e.field());
                    match e {
                        ElementError::Datatype(name) => invalid(
                            field,
                            format!(
                                "`{name}` has no JSON form here: use BOOL, UINT8, INT32, UINT32, \
                                 INT64, FP32, FP64 or BYTES (FP16 and BF16 as binary data)"
                            ),
                        ),
                        other => invalid(field, other.to_string()),
                    }
                })?,
            ),
        };
        inputs.push(data);
    }
    if !binary.is_empty() {
        return Err(invalid(
            "body",
            format!("{} bytes of binary data that no input claims", binary.len()),
        ));
    }
    let mut parameters = request.parameters;
    let binary = flag(
        parameters.as_ref(),
        "binary_data_output",
        "parameters.binary_data_output",
    )?
    .unwrap_or(false);
    if let Some(p) = parameters.as_mut() {
        p.remove("binary_data_output");
    }
    let wanted = match request.outputs {
        None => None,
        Some(outputs) => Some(
            outputs
                .into_iter()
                .enumerate()
                .map(|(i, o)| {
                    let choice = flag(
                        o.parameters.as_ref(),
                        "binary_data",
                        &format!("outputs[{i}].parameters.binary_data"),
                    )?;
                    Ok((o.name, choice))
                })
                .collect::<Result<Vec<_>, Invalid>>()?,
        ),
    };
    Ok(Request {
        id: request.id,
        inputs,
        parameters: parameters.filter(|p| !p.is_empty()),
        outputs: OutputChoice { wanted, binary },
    })
}

fn collect_strings(value: &Value, out: &mut Vec<Vec<u8>>) -> Result<(), String> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| collect_strings(v, out)),
        Value::String(s) => {
            out.push(s.as_bytes().to_vec());
            Ok(())
        }
        other => Err(format!("BYTES elements must be strings, not {other}")),
    }
}

/// A model output's tensors, as [`Data`].
pub fn model_outputs(output: &ModelOutput) -> Vec<Data> {
    output.tensors.iter().cloned().map(Data::Numbers).collect()
}

/// A processor's KServe JSON answer (`{"outputs": [...], "parameters"}`) as [`Data`] and
/// its parameters; the error says what is wrong with it.
pub fn processor_outputs(body: &[u8]) -> Result<(Vec<Data>, Option<Value>), String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the processor's answer is not JSON: {e}"))?;
    let outputs = value["outputs"]
        .as_array()
        .ok_or("the processor's answer has no `outputs` list")?;
    let mut data = Vec::with_capacity(outputs.len());
    for (i, o) in outputs.iter().enumerate() {
        let name = o["name"]
            .as_str()
            .ok_or(format!("outputs[{i}] has no name"))?;
        let shape = o["shape"]
            .as_array()
            .and_then(|d| d.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or(format!("outputs[{i}].shape is not a list of sizes"))?;
        let datatype = o["datatype"].as_str().unwrap_or_default();
        if datatype == "BYTES" {
            let mut items = Vec::new();
            collect_strings(&o["data"], &mut items)
                .map_err(|e| format!("outputs[{i}].data: {e}"))?;
            data.push(Data::Bytes {
                name: name.to_owned(),
                shape,
                items,
            });
        } else {
            let tensor = tensor_from_json(name.to_owned(), shape, datatype, &o["data"])
                .map_err(|e| format!("outputs[{i}].{}: {e}", e.field()))?;
            data.push(Data::Numbers(tensor));
        }
    }
    let parameters = value.get("parameters").filter(|p| p.is_object()).cloned();
    Ok((data, parameters))
}

/// An encoded response: the body, and the JSON header's length when it has binary data.
pub struct Encoded {
    /// The body.
    pub body: Vec<u8>,
    /// `Inference-Header-Content-Length`, when outputs are binary.
    pub header_length: Option<usize>,
}

/// The response for `outputs`: those asked for (all, by default), each as JSON or binary
/// as asked. An output asked for that the model did not give is an error (its field).
pub(crate) fn encode(
    model: &str,
    version: &str,
    id: Option<&str>,
    parameters: Option<Value>,
    outputs: Vec<Data>,
    choice: &OutputChoice,
) -> Result<Encoded, Invalid> {
    let picked: Vec<(Data, bool)> = match &choice.wanted {
        None => outputs.into_iter().map(|d| (d, choice.binary)).collect(),
        Some(wanted) => {
            let mut picked = Vec::with_capacity(wanted.len());
            for (i, (name, binary)) in wanted.iter().enumerate() {
                let found = outputs.iter().find(|d| d.name() == name).ok_or_else(|| {
                    let given: Vec<&str> = outputs.iter().map(Data::name).collect();
                    invalid(
                        format!("outputs[{i}].name"),
                        format!("the model gives no output `{name}` (it gives {given:?})"),
                    )
                })?;
                picked.push((found.clone(), binary.unwrap_or(choice.binary)));
            }
            picked
        }
    };
    let mut tail = Vec::new();
    let mut tensors = Vec::with_capacity(picked.len());
    for (data, binary) in picked {
        let (name, datatype, shape, raw) = match &data {
            Data::Numbers(t) => (
                t.name.clone(),
                t.dtype.kserve_name().to_owned(),
                t.shape.clone(),
                None,
            ),
            Data::Bytes { name, shape, items } => {
                (name.clone(), "BYTES".to_owned(), shape.clone(), Some(items))
            }
        };
        if binary {
            let bytes = match (&data, raw) {
                (_, Some(items)) => join_bytes(items),
                (Data::Numbers(t), None) => t.data.clone(),
                (Data::Bytes { .. }, None) => Vec::new(),
            };
            tensors.push(OutputTensor {
                name,
                datatype,
                shape,
                parameters: Some(serde_json::json!({ "binary_data_size": bytes.len() })),
                data: None,
            });
            tail.extend_from_slice(&bytes);
        } else {
            let json = data.to_json().map_err(|e| invalid("outputs", e))?;
            tensors.push(OutputTensor {
                name,
                datatype,
                shape,
                parameters: None,
                data: json["data"].as_array().cloned(),
            });
        }
    }
    let response = InferResponse {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: id.map(str::to_owned),
        parameters,
        outputs: tensors,
    };
    let mut body = serde_json::to_vec(&response).map_err(|e| invalid("outputs", e.to_string()))?;
    let header_length = (!tail.is_empty()
        || response.outputs.iter().any(|o| o.parameters.is_some()))
    .then_some(body.len());
    body.extend_from_slice(&tail);
    Ok(Encoded {
        body,
        header_length,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_nested_and_flat_data() {
        let body = br#"{"id":"r1","inputs":[
            {"name":"input_ids","shape":[2,2],"datatype":"INT64","data":[[101,102],[101,102]]},
            {"name":"mask","shape":[4],"datatype":"BOOL","data":[true,false,1,0]}]}"#;
        let mut req = parse(body, None).unwrap();
        assert_eq!(req.id.as_deref(), Some("r1"));
        assert!(!req.has_text());
        let input = req.take_model_input();
        assert_eq!(input.tensors[0].to_i64().unwrap(), [101, 102, 101, 102]);
        assert_eq!(input.tensors[1].data, [1, 0, 1, 0]);
    }

    #[test]
    fn names_the_bad_field() {
        let field = |body: &[u8]| parse(body, None).err().unwrap().field;
        assert_eq!(
            field(br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#),
            "inputs[0].data"
        );
        assert_eq!(
            field(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[1]}]}"#),
            "inputs[0].datatype"
        );
        assert_eq!(
            field(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#),
            "inputs[0].data"
        );
        assert_eq!(
            field(br#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"UINT8","data":[]}]}"#),
            "inputs[0].shape"
        );
        assert_eq!(field(b"{"), "body");
        assert_eq!(field(br#"{"inputs":[]}"#), "inputs");
        assert_eq!(
            field(br#"{"inputs":[{"name":"t","shape":[2],"datatype":"BYTES","data":["a"]}]}"#),
            "inputs[0].data"
        );
    }

    fn binary_body(header: Value, tail: &[u8]) -> (Vec<u8>, usize) {
        let mut body = serde_json::to_vec(&header).unwrap();
        let n = body.len();
        body.extend_from_slice(tail);
        (body, n)
    }

    #[test]
    fn binary_inputs_take_their_bytes_in_order() {
        let mut tail: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        tail.extend(join_bytes(&[
            b"hello".to_vec(),
            b"".to_vec(),
            "é".as_bytes().to_vec(),
        ]));
        let (body, n) = binary_body(
            json!({"inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "t", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": 19}},
            ], "parameters": {"binary_data_output": true, "priority": 1}}),
            &tail,
        );
        let req = parse(&body, Some(n)).unwrap();
        let Data::Numbers(x) = &req.inputs[0] else {
            panic!("not numbers: {:?}", req.inputs[0]);
        };
        assert_eq!(x.to_f32().unwrap(), [1.5, -2.0]);
        assert!(req.has_text());
        assert_eq!(
            req.inputs[1],
            Data::Bytes {
                name: "t".into(),
                shape: vec![3],
                items: vec![b"hello".to_vec(), vec![], "é".as_bytes().to_vec()]
            }
        );
        assert!(req.outputs.binary);
        assert_eq!(req.parameters.unwrap()["priority"], 1);
        // The processor reads plain JSON.
        let plain: Value = serde_json::from_slice(&req_json(&body, n)).unwrap();
        assert_eq!(plain["inputs"][1]["data"], json!(["hello", "", "é"]));
        assert_eq!(plain["inputs"][0]["data"], json!([1.5, -2.0]));
    }

    fn req_json(body: &[u8], n: usize) -> Vec<u8> {
        parse(body, Some(n)).unwrap().to_json("m").unwrap()
    }

    #[test]
    fn binary_sizes_that_do_not_fit_are_named() {
        let (body, n) = binary_body(
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}),
            &[0; 12],
        );
        let err = parse(&body, Some(n)).err().unwrap();
        assert_eq!(err.field, "inputs[0].parameters.binary_data_size");
        let (body, n) = binary_body(
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}),
            &[0; 12],
        );
        assert_eq!(parse(&body, Some(n)).err().unwrap().field, "body");
        assert_eq!(
            parse(&body, Some(body.len() + 1)).err().unwrap().field,
            "Inference-Header-Content-Length"
        );
        let (body, n) = binary_body(
            json!({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}),
            &[9, 0, 0, 0, b'a', b'b'],
        );
        assert_eq!(parse(&body, Some(n)).err().unwrap().field, "inputs[0].data");
    }

    #[test]
    fn outputs_are_picked_and_sent_as_asked() {
        let outputs = vec![
            Data::Numbers(Tensor::from_f32("y", vec![1, 2], &[0.5, -1.0])),
            Data::Numbers(Tensor::from_i64("n", vec![1], &[7])),
        ];
        let all = encode(
            "m",
            "v1",
            Some("r1"),
            None,
            outputs.clone(),
            &OutputChoice::default(),
        )
        .unwrap();
        assert_eq!(all.header_length, None);
        let body: Value = serde_json::from_slice(&all.body).unwrap();
        assert_eq!(body["outputs"][0]["data"], json!([0.5, -1.0]));
        assert_eq!(body["outputs"][1]["data"], json!([7]));
        assert_eq!(body["id"], "r1");

        let choice = OutputChoice {
            wanted: Some(vec![("n".into(), None), ("y".into(), Some(true))]),
            binary: false,
        };
        let some = encode("m", "v1", None, None, outputs.clone(), &choice).unwrap();
        let n = some.header_length.unwrap();
        let header: Value = serde_json::from_slice(&some.body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["name"], "n");
        assert_eq!(header["outputs"][0]["data"], json!([7]));
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert!(header["outputs"][1].get("data").is_none());
        let tail: Vec<u8> = [0.5f32, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(&some.body[n..], &tail[..]);

        let unknown = OutputChoice {
            wanted: Some(vec![("z".into(), None)]),
            binary: false,
        };
        let err = encode("m", "v1", None, None, outputs, &unknown)
            .err()
            .unwrap();
        assert_eq!(err.field, "outputs[0].name");
    }

    #[test]
    fn processor_answers_become_outputs() {
        let (data, parameters) = processor_outputs(
            br#"{"outputs":[{"name":"embeddings","datatype":"FP32","shape":[1,2],"data":[[0.6,0.8]]},
                 {"name":"tokens","datatype":"BYTES","shape":[1],"data":["x"]}],"parameters":{"k":1}}"#,
        )
        .unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(parameters.unwrap()["k"], 1);
        assert!(processor_outputs(b"{}").is_err());
        assert!(
            processor_outputs(
                br#"{"outputs":[{"name":"e","datatype":"FP32","shape":[2],"data":[1]}]}"#
            )
            .is_err()
        );
    }
}

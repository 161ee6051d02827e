//! The KServe v2 (Open Inference Protocol) JSON tensor encoding: request inputs to model
//! tensors, model tensors to response outputs.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasp_core::kserve::{ElementError, tensor_from_json, tensor_to_json};
use wasp_core::{ModelInput, ModelOutput};

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
    /// Request parameters (passed on as the model input's metadata).
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
    /// Requested outputs (every output is returned).
    #[serde(default)]
    #[allow(dead_code)]
    outputs: Option<Vec<Value>>,
}

/// One input tensor of a KServe v2 request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputTensor {
    /// Tensor name, as the model names its input.
    name: String,
    /// Dimensions.
    shape: Vec<u64>,
    /// `FP32`, `FP64`, `INT64`, `INT32`, `UINT32`, `UINT8` or `BOOL`.
    datatype: String,
    /// Elements, row-major, flat or nested.
    data: Value,
    /// Tensor parameters (ignored).
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<serde_json::Map<String, Value>>,
}

/// A KServe v2 inference response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct InferResponse {
    /// The endpoint.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's id, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The output tensors.
    pub outputs: Vec<OutputTensor>,
    /// The model output's metadata, when it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// One output tensor of a KServe v2 response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: &'static str,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Elements, row-major, flat.
    pub data: Vec<Value>,
}

/// A parsed inference request.
pub struct Request {
    /// The request id, echoed in the response.
    pub id: Option<String>,
    /// The model input.
    pub input: ModelInput,
}

/// Parses a v2 inference request body.
pub fn parse(body: &[u8]) -> Result<Request, Invalid> {
    let request: InferRequest = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("not a KServe v2 inference request: {e}")))?;
    if request.inputs.is_empty() {
        return Err(invalid("inputs", "at least one input is required"));
    }
    let mut tensors = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.into_iter().enumerate() {
        let tensor = tensor_from_json(input.name, input.shape, &input.datatype, &input.data)
            .map_err(|e| {
                let field = format!("inputs[{i}].{}", e.field());
                match e {
                    ElementError::Datatype(name) => {
                        let hint = if name == "BYTES" {
                            "BYTES tensors (text) go through the endpoint's processor: use its \
                             invoke route"
                        } else {
                            "use FP32, FP64, INT64, INT32, UINT32, UINT8 or BOOL"
                        };
                        invalid(field, format!("`{name}` is not supported here: {hint}"))
                    }
                    other => invalid(field, other.to_string()),
                }
            })?;
        tensors.push(tensor);
    }
    Ok(Request {
        id: request.id,
        input: ModelInput {
            tensors,
            parameters: request.parameters.map(|p| Value::Object(p).to_string()),
        },
    })
}

/// The v2 response body for a model output.
pub(crate) fn response(
    model: &str,
    version: &str,
    id: Option<&str>,
    output: &ModelOutput,
) -> InferResponse {
    InferResponse {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: id.map(str::to_owned),
        outputs: output
            .tensors
            .iter()
            .map(|t| OutputTensor {
                name: t.name.clone(),
                datatype: t.dtype.kserve_name(),
                shape: t.shape.clone(),
                data: tensor_to_json(t).unwrap_or_default(),
            })
            .collect(),
        parameters: output
            .metadata
            .as_ref()
            .and_then(|meta| serde_json::from_str::<Value>(meta).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasp_core::Tensor;

    #[test]
    fn parses_nested_and_flat_data() {
        let body = br#"{"id":"r1","inputs":[
            {"name":"input_ids","shape":[2,2],"datatype":"INT64","data":[[101,102],[101,102]]},
            {"name":"mask","shape":[4],"datatype":"BOOL","data":[true,false,1,0]}]}"#;
        let req = parse(body).unwrap();
        assert_eq!(req.id.as_deref(), Some("r1"));
        assert_eq!(req.input.tensors[0].to_i64().unwrap(), [101, 102, 101, 102]);
        assert_eq!(req.input.tensors[1].data, [1, 0, 1, 0]);
    }

    #[test]
    fn names_the_bad_field() {
        let count =
            parse(br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#);
        assert_eq!(count.err().unwrap().field, "inputs[0].data");
        let dtype =
            parse(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#);
        let err = dtype.err().unwrap();
        assert_eq!(err.field, "inputs[0].datatype");
        assert!(err.message.contains("invoke route"));
        let range =
            parse(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#);
        assert_eq!(range.err().unwrap().field, "inputs[0].data");
        assert_eq!(parse(b"{").err().unwrap().field, "body");
        assert_eq!(parse(br#"{"inputs":[]}"#).err().unwrap().field, "inputs");
    }

    #[test]
    fn encodes_outputs() {
        let output = ModelOutput {
            tensors: vec![Tensor::from_f32("y", vec![1, 2], &[0.5, -1.0])],
            metadata: None,
            index: 0,
            last: true,
        };
        let body = serde_json::to_value(response("m", "v1", Some("r1"), &output)).unwrap();
        assert_eq!(body["outputs"][0]["data"], json!([0.5, -1.0]));
        assert_eq!(body["outputs"][0]["datatype"], "FP32");
        assert_eq!(body["id"], "r1");
    }
}

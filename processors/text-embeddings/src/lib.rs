//! OpenAI-compatible text embeddings around a BERT-family encoder (all-MiniLM-L6-v2, say).
//!
//! - `pre_process`: an OpenAI embeddings request (`input` a string or an array of strings)
//!   becomes `input_ids`, `attention_mask` and `token_type_ids` tensors of shape
//!   `[n, longest]`, tokenized with the model's own `tokenizer.json` (the `tokenizers`
//!   crate, compiled to wasm). Inputs over the token limit are refused with a clear error,
//!   or truncated when configured so.
//! - `post_process`: the encoder's `last_hidden_state` is mean-pooled over each input's
//!   tokens and L2-normalised (what sentence-transformers does for this model), and the
//!   answer is an OpenAI embeddings response with usage counts.
//!
//! Configuration: `TOKENIZER` (path of tokenizer.json inside the processor's mounts,
//! default `/model/tokenizer.json`), `MAX_TOKENS` (default 256, the model's sequence
//! limit), `TRUNCATE` (`true` cuts long inputs instead of refusing them; default `false`),
//! `MODEL_NAME` (the `model` field of answers; default the request's `model`).

use std::sync::OnceLock;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use wasp_sdk::{Error, ModelInput, ModelOutput, Prepared, Processor, Request, Response, Tensor};

/// Settings read once per instance.
pub struct Settings {
    /// The model's tokenizer, with its own truncation and padding turned off.
    pub tokenizer: Tokenizer,
    /// Most tokens per input, special tokens included.
    pub max_tokens: usize,
    /// Cut long inputs instead of refusing them.
    pub truncate: bool,
    /// Name to answer with, if set.
    pub model_name: Option<String>,
}

impl Settings {
    /// Loads the tokenizer from `tokenizer.json` bytes.
    pub fn new(tokenizer_json: &[u8], max_tokens: usize, truncate: bool) -> Result<Self, Error> {
        let mut tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::internal(format!("tokenizer.json is not a tokenizer: {e}")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::internal(format!("cannot configure the tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            max_tokens,
            truncate,
            model_name: None,
        })
    }
}

fn settings() -> Result<&'static Settings, Error> {
    static SETTINGS: OnceLock<Result<Settings, Error>> = OnceLock::new();
    SETTINGS
        .get_or_init(|| {
            let path = wasp_sdk::config::get("TOKENIZER")
                .unwrap_or_else(|| "/model/tokenizer.json".into());
            let json = std::fs::read(&path).map_err(|e| {
                Error::internal(format!(
                    "cannot read the tokenizer at {path}: {e} (mount the model directory and set TOKENIZER)"
                ))
            })?;
            let max_tokens = wasp_sdk::config::parse_or("MAX_TOKENS", 256usize)?;
            let truncate = wasp_sdk::config::parse_or("TRUNCATE", false)?;
            let mut settings = Settings::new(&json, max_tokens, truncate)?;
            settings.model_name = wasp_sdk::config::get("MODEL_NAME");
            Ok(settings)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The `input` of an embeddings request.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: serde_json::Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// What post-processing needs to know about a request.
#[derive(Serialize, Deserialize)]
pub struct Context {
    /// Token count of each input.
    pub lengths: Vec<usize>,
    /// The `model` to answer with.
    pub model: String,
    /// `float` or `base64`.
    pub base64: bool,
    /// Whether the request came over KServe v2 (text as a `BYTES` tensor): the answer is
    /// then a KServe output tensor, `embeddings`.
    #[serde(default)]
    pub kserve: bool,
}

/// The texts of a KServe v2 request: its `BYTES` input (the one called `text`, if several).
fn kserve_texts(request: &Request) -> Result<Vec<String>, Error> {
    let body: serde_json::Value = request.json()?;
    let inputs = body["inputs"].as_array().cloned().unwrap_or_default();
    let bytes: Vec<(usize, &serde_json::Value)> = inputs
        .iter()
        .enumerate()
        .filter(|(_, i)| i["datatype"] == "BYTES")
        .collect();
    let (index, input) = bytes
        .iter()
        .find(|(_, i)| i["name"] == "text")
        .or(bytes.first())
        .copied()
        .ok_or_else(|| Error::bad_request("no BYTES input (text) to embed").with_field("inputs"))?;
    let mut texts = Vec::new();
    let mut stack = vec![&input["data"]];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Array(items) => stack.extend(items.iter().rev()),
            serde_json::Value::String(text) => texts.push(text.clone()),
            _ => {
                return Err(Error::bad_request("BYTES elements must be text")
                    .with_field(format!("inputs[{index}].data")));
            }
        }
    }
    if texts.is_empty() {
        return Err(
            Error::bad_request("no text to embed").with_field(format!("inputs[{index}].data"))
        );
    }
    if texts.len() > 2048 {
        return Err(Error::bad_request("at most 2048 texts per request")
            .with_field(format!("inputs[{index}].data")));
    }
    Ok(texts)
}

/// The three token tensors of a batch of texts, padded to the longest.
pub struct Encoded {
    /// `input_ids`, `attention_mask`, `token_type_ids`, each `[n, longest]` of i64.
    pub tensors: Vec<Tensor>,
    /// Token count of each text.
    pub lengths: Vec<usize>,
}

/// Tokenizes `texts` (the part of pre-processing that is pure computation).
pub fn encode(settings: &Settings, texts: &[String]) -> Result<Encoded, Error> {
    let mut rows = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let field = || {
            if texts.len() == 1 {
                "input".to_owned()
            } else {
                format!("input[{i}]")
            }
        };
        if text.is_empty() {
            return Err(Error::bad_request("must not be an empty string").with_field(field()));
        }
        let encoding = settings
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| Error::bad_request(format!("cannot tokenize: {e}")).with_field(field()))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&x| i64::from(x)).collect();
        let mut types: Vec<i64> = encoding
            .get_type_ids()
            .iter()
            .map(|&x| i64::from(x))
            .collect();
        if ids.len() > settings.max_tokens {
            if !settings.truncate {
                return Err(Error::bad_request(format!(
                    "input has {} tokens; this model takes at most {} (set TRUNCATE=true to cut instead)",
                    ids.len(),
                    settings.max_tokens
                ))
                .with_field(field()));
            }
            // Keep the closing special token ([SEP]) as sentence-transformers does.
            let last = ids[ids.len() - 1];
            ids.truncate(settings.max_tokens);
            types.truncate(settings.max_tokens);
            if let Some(end) = ids.last_mut() {
                *end = last;
            }
        }
        rows.push((ids, types));
    }
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let n = rows.len();
    let mut ids = Vec::with_capacity(n * width);
    let mut mask = Vec::with_capacity(n * width);
    let mut types = Vec::with_capacity(n * width);
    let mut lengths = Vec::with_capacity(n);
    for (row_ids, row_types) in rows {
        let pad = width - row_ids.len();
        lengths.push(row_ids.len());
        mask.extend(std::iter::repeat_n(1i64, row_ids.len()));
        mask.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(row_ids);
        ids.extend(std::iter::repeat_n(0i64, pad));
        types.extend(row_types);
        types.extend(std::iter::repeat_n(0i64, pad));
    }
    let shape = vec![n as u64, width as u64];
    Ok(Encoded {
        tensors: vec![
            Tensor::from_i64("input_ids", shape.clone(), &ids),
            Tensor::from_i64("attention_mask", shape.clone(), &mask),
            Tensor::from_i64("token_type_ids", shape, &types),
        ],
        lengths,
    })
}

/// Mean-pools each row's first `lengths[i]` token vectors and L2-normalises the result.
pub fn pool(hidden: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<f32>>, Error> {
    let [n, width, dim] = hidden.shape[..] else {
        return Err(Error::internal(format!(
            "expected last_hidden_state of shape [n, tokens, dim], got {:?}",
            hidden.shape
        )));
    };
    let (n, width, dim) = (n as usize, width as usize, dim as usize);
    if n != lengths.len() {
        return Err(Error::internal(format!(
            "model returned {n} rows for {} inputs",
            lengths.len()
        )));
    }
    let values = hidden.to_f32()?;
    let mut out = Vec::with_capacity(n);
    for (row, &len) in lengths.iter().enumerate() {
        let len = len.min(width);
        let mut sum = vec![0f32; dim];
        for token in 0..len {
            let start = (row * width + token) * dim;
            for (acc, v) in sum.iter_mut().zip(&values[start..start + dim]) {
                *acc += v;
            }
        }
        let count = len.max(1) as f32;
        sum.iter_mut().for_each(|v| *v /= count);
        let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        sum.iter_mut().for_each(|v| *v /= norm);
        out.push(sum);
    }
    Ok(out)
}

struct TextEmbeddings;

impl Processor for TextEmbeddings {
    fn init() -> Result<(), Error> {
        settings().map(|_| ())
    }

    fn pre_process(request: Request) -> Result<Prepared, Error> {
        let settings = settings()?;
        if request.path.starts_with("/v2/") && request.path.ends_with("/infer") {
            let texts = kserve_texts(&request)?;
            let encoded = encode(settings, &texts)?;
            let context = serde_json::to_vec(&Context {
                lengths: encoded.lengths,
                model: String::new(),
                base64: false,
                kserve: true,
            })
            .map_err(|e| Error::internal(format!("cannot encode context: {e}")))?;
            return Ok(Prepared {
                input: ModelInput {
                    tensors: encoded.tensors,
                    parameters: None,
                },
                context,
            });
        }
        let body: EmbeddingsRequest = request.json()?;
        let texts = match serde_json::from_value::<Input>(body.input) {
            Ok(Input::One(text)) => vec![text],
            Ok(Input::Many(texts)) if texts.is_empty() => {
                return Err(Error::bad_request("must not be an empty array").with_field("input"));
            }
            Ok(Input::Many(texts)) if texts.len() > 2048 => {
                return Err(
                    Error::bad_request("at most 2048 inputs per request").with_field("input")
                );
            }
            Ok(Input::Many(texts)) => texts,
            Err(_) => {
                return Err(
                    Error::bad_request("must be a string or an array of strings")
                        .with_field("input"),
                );
            }
        };
        let base64 = match body.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(
                    Error::bad_request(format!("`{other}` is not `float` or `base64`"))
                        .with_field("encoding_format"),
                );
            }
        };
        if body.dimensions.is_some() {
            return Err(
                Error::bad_request("this model does not support shortened embeddings")
                    .with_field("dimensions"),
            );
        }
        let encoded = encode(settings, &texts)?;
        let model = settings
            .model_name
            .clone()
            .or(body.model)
            .unwrap_or_else(|| "embeddings".into());
        let context = serde_json::to_vec(&Context {
            lengths: encoded.lengths,
            model,
            base64,
            kserve: false,
        })
        .map_err(|e| Error::internal(format!("cannot encode context: {e}")))?;
        Ok(Prepared {
            input: ModelInput {
                tensors: encoded.tensors,
                parameters: None,
            },
            context,
        })
    }

    fn post_process(context: Vec<u8>, output: ModelOutput) -> Result<Response, Error> {
        let context: Context = serde_json::from_slice(&context)
            .map_err(|e| Error::internal(format!("bad context: {e}")))?;
        let hidden = output
            .tensors
            .iter()
            .find(|t| t.name == "last_hidden_state")
            .ok_or_else(|| Error::internal("the model returned no last_hidden_state"))?;
        let vectors = pool(hidden, &context.lengths)?;
        if context.kserve {
            let dim = vectors.first().map_or(0, Vec::len);
            let flat: Vec<f32> = vectors.concat();
            return Ok(Response::json(&serde_json::json!({
                "outputs": [{
                    "name": "embeddings",
                    "datatype": "FP32",
                    "shape": [vectors.len(), dim],
                    "data": flat,
                }],
            })));
        }
        let data: Vec<serde_json::Value> = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if context.base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    serde_json::Value::String(
                        base64::engine::general_purpose::STANDARD.encode(bytes),
                    )
                } else {
                    serde_json::json!(v)
                };
                serde_json::json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        let tokens: usize = context.lengths.iter().sum();
        Ok(Response::json(&serde_json::json!({
            "object": "list",
            "data": data,
            "model": context.model,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        })))
    }
}

wasp_sdk::processor!(TextEmbeddings);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_over_real_tokens_only() {
        // Two rows, width 3, dim 2; row 0 has 2 real tokens, row 1 has 1.
        let values = [
            1.0, 0.0, 3.0, 0.0, 99.0, 99.0, 0.0, 2.0, 50.0, 50.0, 50.0, 50.0,
        ];
        let hidden = Tensor::from_f32("last_hidden_state", vec![2, 3, 2], &values);
        let pooled = pool(&hidden, &[2, 1]).unwrap();
        assert_eq!(pooled[0], [1.0, 0.0]);
        assert_eq!(pooled[1], [0.0, 1.0]);
        assert!(pool(&hidden, &[1]).is_err());
    }
}

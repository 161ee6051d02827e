//! OpenAI chat and text completions in front of a generation backend (the candle
//! backend's `generate` task with SmolLM2, say).
//!
//! - `pre_process`: an OpenAI request (`/v1/chat/completions` with `messages`, or
//!   `/v1/completions` with `prompt`) is checked field by field (a bad one is a 400 naming
//!   it), chat messages go through the model's own chat template (Jinja, from
//!   `tokenizer_config.json`, rendered by minijinja), and the text is tokenized with the
//!   model's `tokenizer.json`. The backend gets `input_ids` and the generation settings as
//!   its `parameters`.
//! - `post_process`: each chunk's token ids are decoded (the backend sends whole
//!   characters, and holds a possible stop sequence back until it is sure, so a chunk
//!   decodes on its own), a stop sequence is cut where it begins, and the text is written
//!   as OpenAI writes it: one `chat.completion`, or with `stream: true` server-sent events
//!   (`data: {chat.completion.chunk}` ... `data: [DONE]`), with `usage` when
//!   `stream_options.include_usage` asks.
//!
//! Configuration: `TOKENIZER` (default `/model/tokenizer.json`), `TOKENIZER_CONFIG`
//! (default `/model/tokenizer_config.json`: `chat_template`, `bos_token`, `eos_token`,
//! `model_max_length`), `CONTEXT_LENGTH` (default the config's `model_max_length`, else
//! 2048), `DEFAULT_MAX_TOKENS` (chat requests without `max_tokens`; default 1024, and never
//! past the context), `MODEL_NAME` (the `model` of answers; default the request's).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use wasp_sdk::{Error, ModelInput, ModelOutput, Prepared, Processor, Request, Response, Tensor};

/// What an instance loads once.
struct Settings {
    tokenizer: Tokenizer,
    template: Option<String>,
    bos: String,
    eos: String,
    context: usize,
    default_max_tokens: usize,
    model_name: Option<String>,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    model_max_length: Option<u64>,
}

fn settings() -> Result<&'static Settings, Error> {
    static SETTINGS: OnceLock<Result<Settings, Error>> = OnceLock::new();
    SETTINGS
        .get_or_init(|| {
            let read = |key: &str, default: &str| {
                let path = wasp_sdk::config::get(key).unwrap_or_else(|| default.into());
                std::fs::read(&path).map_err(|e| {
                    Error::internal(format!(
                        "cannot read {path}: {e} (mount the model directory and set {key})"
                    ))
                })
            };
            let tokenizer = Tokenizer::from_bytes(read("TOKENIZER", "/model/tokenizer.json")?)
                .map_err(|e| Error::internal(format!("tokenizer.json is not a tokenizer: {e}")))?;
            let config: TokenizerConfig =
                serde_json::from_slice(&read("TOKENIZER_CONFIG", "/model/tokenizer_config.json")?)
                    .map_err(|e| Error::internal(format!("tokenizer_config.json: {e}")))?;
            let context = wasp_sdk::config::parse_or(
                "CONTEXT_LENGTH",
                config.model_max_length.map_or(2048, |n| n as usize),
            )?;
            Ok(Settings {
                tokenizer,
                template: config.chat_template,
                bos: config.bos_token.unwrap_or_default(),
                eos: config.eos_token.unwrap_or_default(),
                context,
                default_max_tokens: wasp_sdk::config::parse_or("DEFAULT_MAX_TOKENS", 1024usize)?,
                model_name: wasp_sdk::config::get("MODEL_NAME"),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Which route the request came by.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Chat,
    Text,
    /// KServe v2 inference with the prompt as a `BYTES` input (as Triton's LLM backends
    /// take it); answered as KServe outputs, one `text_output` per chunk.
    Kserve,
}

/// What post-processing needs to know about a request.
#[derive(Serialize, Deserialize)]
struct Context {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
}

/// The generation settings the backend takes (its `parameters`).
#[derive(Serialize, Default, Debug, PartialEq)]
struct Parameters {
    max_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    stop: Vec<String>,
    stream: bool,
}

fn bad(field: &str, message: impl Into<String>) -> Error {
    Error::bad_request(message).with_field(field)
}

/// A number field within `range`, if present.
fn number(
    body: &Value,
    field: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<f64>, Error> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v
                .as_f64()
                .ok_or_else(|| bad(field, format!("`{field}` must be a number")))?;
            if range.contains(&n) {
                Ok(Some(n))
            } else {
                Err(bad(
                    field,
                    format!(
                        "`{field}` must be between {} and {}, not {n}",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        }
    }
}

/// A non-negative integer field, if present.
fn integer(body: &Value, field: &str) -> Result<Option<u64>, Error> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(field, format!("`{field}` must be a non-negative integer"))),
    }
}

/// Request fields both routes take.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "logprobs",
];
/// Fields of chat requests only.
const CHAT_FIELDS: &[&str] = &["messages", "max_completion_tokens", "response_format"];
/// Fields of text completion requests only.
const TEXT_FIELDS: &[&str] = &["prompt", "echo", "suffix"];

/// A KServe v2 request as the completion request it asks for: the text of its `BYTES`
/// input `text_input` (or its only `BYTES` input) is the prompt, taken as it is (as
/// Triton's LLM backends take it), and its `parameters` are the completion's fields
/// (`max_tokens`, `temperature`, `stop`, `stream`, ...).
fn kserve_body(body: &Value) -> Result<Value, Error> {
    let inputs = body["inputs"]
        .as_array()
        .ok_or_else(|| bad("inputs", "`inputs` must be a list of tensors"))?;
    let texts: Vec<(usize, &Value)> = inputs
        .iter()
        .enumerate()
        .filter(|(_, i)| i["datatype"] == "BYTES")
        .collect();
    let named = texts.iter().find(|(_, i)| i["name"] == "text_input");
    let (index, input) = match (named, texts.as_slice()) {
        (Some(found), _) => *found,
        (None, [only]) => *only,
        _ => {
            return Err(bad(
                "inputs",
                "send the prompt as a BYTES input named `text_input`",
            ));
        }
    };
    let mut prompts = Vec::new();
    let mut stack = vec![&input["data"]];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items.iter().rev()),
            Value::String(text) => prompts.push(text.as_str()),
            _ => {
                return Err(bad(
                    &format!("inputs[{index}].data"),
                    "BYTES elements must be text",
                ));
            }
        }
    }
    let [prompt] = prompts.as_slice() else {
        return Err(bad(
            &format!("inputs[{index}].data"),
            format!("one prompt per request, not {}", prompts.len()),
        ));
    };
    let mut fields = match body.get("parameters") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(parameters)) => parameters.clone(),
        Some(_) => return Err(bad("parameters", "`parameters` must be an object")),
    };
    if let Some(key) = fields.keys().find(|k| k.as_str() == "prompt") {
        return Err(bad(
            key,
            "the prompt is the `text_input` tensor, not a parameter",
        ));
    }
    fields.insert("prompt".into(), Value::String((*prompt).to_owned()));
    Ok(Value::Object(fields))
}

/// The prompt text of a chat request: its messages through the chat template.
fn chat_prompt(settings: &Settings, messages: &Value) -> Result<String, Error> {
    let list = messages
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("messages", "`messages` must be a non-empty array"))?;
    let mut plain = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = |name: &str| format!("messages[{i}].{name}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&field("role"), "each message needs a string `role`"))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(bad(
                &field("role"),
                format!("`{role}` is not a role (system, developer, user, assistant)"),
            ));
        }
        let role = if role == "developer" { "system" } else { role };
        let content = match m.get("content") {
            Some(Value::String(text)) => text.clone(),
            // Content parts: text only.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(bad(
                                &format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
            _ => return Err(bad(&field("content"), "each message needs `content` text")),
        };
        plain.push(json!({"role": role, "content": content}));
    }
    let Some(template) = &settings.template else {
        // No template: the messages' text, one per line.
        return Ok(plain
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect::<Vec<_>>()
            .join("\n"));
    };
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::internal(format!("the model's chat template does not parse: {e}")))?;
    let rendered = env
        .get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => plain,
                add_generation_prompt => true,
                bos_token => settings.bos.clone(),
                eos_token => settings.eos.clone(),
            })
        })
        .map_err(|e| {
            bad(
                "messages",
                format!("the chat template refused the messages: {e}"),
            )
        })?;
    Ok(rendered)
}

/// An id for a completion, unique enough: random bits from the host.
fn new_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now());
    format!("{prefix}-{:016x}", hasher.finish())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn prepare(request: &Request) -> Result<Prepared, Error> {
    let settings = settings()?;
    let path = request.path.split('?').next().unwrap_or("");
    let kind = match path {
        "/v1/chat/completions" | "/chat/completions" => Kind::Chat,
        "/v1/completions" | "/completions" => Kind::Text,
        p if p.starts_with("/v2/models/") && p.ends_with("/infer") => Kind::Kserve,
        other => {
            return Err(Error::not_found(format!(
                "no route `{other}`: POST /v1/chat/completions, /v1/completions or \
                 /v2/models/{{name}}/infer"
            )));
        }
    };
    let body: Value = request.json()?;
    let body = match kind {
        Kind::Kserve => kserve_body(&body)?,
        _ => body,
    };
    let Some(fields) = body.as_object() else {
        return Err(Error::bad_request("the body must be a JSON object"));
    };
    let own = if kind == Kind::Chat {
        CHAT_FIELDS
    } else {
        TEXT_FIELDS
    };
    let known = |k: &str| COMMON_FIELDS.contains(&k) || own.contains(&k);
    if let Some(unknown) = fields.keys().find(|k| !known(k.as_str())) {
        return Err(bad(
            unknown,
            format!("unrecognized request argument `{unknown}`"),
        ));
    }
    let (prompt, prompt_field) = match kind {
        Kind::Chat => (chat_prompt(settings, &body["messages"])?, "messages"),
        Kind::Text | Kind::Kserve => match &body["prompt"] {
            Value::String(p) if !p.is_empty() => (p.clone(), "prompt"),
            Value::Array(list) if list.len() == 1 && list[0].is_string() => {
                (list[0].as_str().unwrap_or_default().to_owned(), "prompt")
            }
            _ => return Err(bad("prompt", "`prompt` must be a non-empty string")),
        },
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "`stream` must be true or false")),
    };
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(options) if !stream => {
            let _ = options;
            return Err(bad(
                "stream_options",
                "`stream_options` needs `stream: true`",
            ));
        }
        Some(options) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "stream_options.include_usage",
                    "`include_usage` must be true or false",
                ));
            }
        },
    };
    if integer(&body, "n")?.is_some_and(|n| n != 1) {
        return Err(bad("n", "only `n: 1` is supported"));
    }
    for field in ["frequency_penalty", "presence_penalty"] {
        if number(&body, field, -2.0..=2.0)?.is_some_and(|v| v != 0.0) {
            return Err(bad(
                field,
                format!("`{field}` is not supported; use `repetition_penalty`"),
            ));
        }
    }
    if body
        .get("logprobs")
        .is_some_and(|v| !v.is_null() && v != &json!(false) && v != &json!(0))
    {
        return Err(bad("logprobs", "`logprobs` is not supported"));
    }
    if kind != Kind::Chat && body.get("echo").is_some_and(|v| v == &json!(true)) {
        return Err(bad("echo", "`echo` is not supported"));
    }
    if kind != Kind::Chat && body.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(bad("suffix", "`suffix` is not supported"));
    }
    if let Some(format) = body.get("response_format").filter(|v| !v.is_null())
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(bad(
            "response_format",
            "only `{\"type\": \"text\"}` is supported",
        ));
    }
    let stops = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop", "`stop` must be a string or an array of strings"))?,
        Some(_) => {
            return Err(bad(
                "stop",
                "`stop` must be a string or an array of strings",
            ));
        }
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(bad("stop", "`stop` takes up to 4 non-empty strings"));
    }

    let encoding = settings
        .tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| bad(prompt_field, format!("cannot tokenize: {e}")))?;
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&t| i64::from(t)).collect();
    if ids.is_empty() {
        return Err(bad(prompt_field, "the prompt has no tokens"));
    }
    let room = settings.context.saturating_sub(ids.len());
    if room == 0 {
        return Err(bad(
            prompt_field,
            format!(
                "this model's maximum context length is {} tokens; the {} come to {} tokens",
                settings.context,
                if kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                },
                ids.len()
            ),
        ));
    }
    let (max_field, asked) = match integer(&body, "max_completion_tokens")? {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", integer(&body, "max_tokens")?),
    };
    let max_tokens = match asked {
        Some(0) => return Err(bad(max_field, format!("`{max_field}` must be at least 1"))),
        Some(n) if n as usize > room => {
            return Err(bad(
                max_field,
                format!(
                    "`{max_field}` is {n}, but the prompt's {} tokens leave room for {room} \
                     in this model's context of {}",
                    ids.len(),
                    settings.context
                ),
            ));
        }
        Some(n) => n as usize,
        // OpenAI's legacy completions default to 16 tokens.
        None if kind == Kind::Text => 16.min(room),
        None => settings.default_max_tokens.min(room),
    };
    let parameters = Parameters {
        max_tokens,
        temperature: number(&body, "temperature", 0.0..=2.0)?,
        top_p: match number(&body, "top_p", 0.0..=1.0)? {
            Some(0.0) => return Err(bad("top_p", "`top_p` must be above 0")),
            other => other,
        },
        top_k: integer(&body, "top_k")?,
        repetition_penalty: match number(&body, "repetition_penalty", 0.0..=10.0)? {
            Some(0.0) => {
                return Err(bad(
                    "repetition_penalty",
                    "`repetition_penalty` must be above 0",
                ));
            }
            other => other,
        },
        seed: integer(&body, "seed")?,
        stop: stops,
        stream,
    };
    let model = settings
        .model_name
        .clone()
        .or_else(|| body.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "chat".into());
    let context = Context {
        kind,
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now(),
        model,
        stream,
        include_usage,
    };
    let count = ids.len() as u64;
    Ok(Prepared {
        input: ModelInput {
            tensors: vec![Tensor::from_i64("input_ids", vec![count], &ids)],
            parameters: Some(
                serde_json::to_string(&parameters)
                    .map_err(|e| Error::internal(format!("cannot encode parameters: {e}")))?,
            ),
        },
        context: serde_json::to_vec(&context)
            .map_err(|e| Error::internal(format!("cannot encode context: {e}")))?,
    })
}

/// The backend's metadata on each chunk.
#[derive(Deserialize, Default)]
struct ChunkMeta {
    finish_reason: Option<String>,
    stop: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// One answer's text, from one chunk.
fn chunk_text(
    settings: &Settings,
    output: &ModelOutput,
    meta: &ChunkMeta,
) -> Result<String, Error> {
    let ids: Vec<u32> = match output.tensors.iter().find(|t| t.name == "token_ids") {
        Some(t) => t
            .to_i64()?
            .into_iter()
            .map(|id| u32::try_from(id).unwrap_or(u32::MAX))
            .collect(),
        None => return Err(Error::internal("the model returned no token_ids")),
    };
    let mut text = settings
        .tokenizer
        .decode(&ids, true)
        .map_err(|e| Error::internal(format!("cannot decode tokens: {e}")))?;
    // The stop sequence and what follows it are not part of the answer.
    if let Some(stop) = &meta.stop
        && let Some(at) = text.find(stop.as_str())
    {
        text.truncate(at);
    }
    Ok(text)
}

fn usage(meta: &ChunkMeta) -> Value {
    json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": meta.completion_tokens,
        "total_tokens": meta.prompt_tokens + meta.completion_tokens,
    })
}

fn finish(context: &Context, output: &ModelOutput, text: String, meta: &ChunkMeta) -> Response {
    let reason = meta.finish_reason.clone();
    if context.kind == Kind::Kserve {
        // KServe outputs: this chunk's text (the whole answer when not streamed).
        let mut parameters = json!({
            "prompt_tokens": meta.prompt_tokens,
            "completion_tokens": meta.completion_tokens,
        });
        if output.last {
            parameters["finish_reason"] = json!(reason.as_deref().unwrap_or("stop"));
        }
        return Response::json(&json!({
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                         "data": [text]}],
            "parameters": parameters,
        }));
    }
    if !context.stream {
        let choice = match context.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Kind::Text | Kind::Kserve => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": reason,
            }),
        };
        return Response::json(&json!({
            "id": context.id,
            "object": if context.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": context.created,
            "model": context.model,
            "choices": [choice],
            "usage": usage(meta),
        }));
    }
    let object = match context.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text | Kind::Kserve => "text_completion",
    };
    let usage_field = if context.include_usage {
        Some(Value::Null)
    } else {
        None
    };
    let event = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": context.id,
            "object": object,
            "created": context.created,
            "model": context.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        format!("data: {chunk}\n\n")
    };
    let choice = |text: Option<&str>, role: bool, reason: Option<&str>| match context.kind {
        Kind::Chat => {
            let mut delta = json!({});
            if role {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}])
        }
        Kind::Text | Kind::Kserve => json!([{
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason,
        }]),
    };
    let mut body = String::new();
    if output.index == 0 && context.kind == Kind::Chat {
        body.push_str(&event(choice(Some(""), true, None), usage_field.clone()));
    }
    if !text.is_empty() {
        body.push_str(&event(
            choice(Some(&text), false, None),
            usage_field.clone(),
        ));
    }
    if output.last {
        body.push_str(&event(
            choice(None, false, Some(reason.as_deref().unwrap_or("stop"))),
            usage_field,
        ));
        if context.include_usage {
            body.push_str(&event(json!([]), Some(usage(meta))));
        }
        body.push_str("data: [DONE]\n\n");
    }
    Response::bytes("text/event-stream", body.into_bytes()).with_header("cache-control", "no-cache")
}

struct Chat;

impl Processor for Chat {
    fn init() -> Result<(), Error> {
        settings().map(|_| ())
    }

    fn pre_process(request: Request) -> Result<Prepared, Error> {
        prepare(&request)
    }

    fn post_process(context: Vec<u8>, output: ModelOutput) -> Result<Response, Error> {
        let settings = settings()?;
        let context: Context = serde_json::from_slice(&context)
            .map_err(|e| Error::internal(format!("bad context: {e}")))?;
        let meta: ChunkMeta = output
            .metadata
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| Error::internal(format!("bad chunk metadata: {e}")))?
            .unwrap_or_default();
        let text = chunk_text(settings, &output, &meta)?;
        Ok(finish(&context, &output, text, &meta))
    }
}

wasp_sdk::processor!(Chat);

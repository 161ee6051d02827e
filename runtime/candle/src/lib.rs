//! The `candle` backend of wasp: native models through candle, on CPU or (with the `cuda`
//! feature) on an NVIDIA GPU.
//!
//! Task `embeddings` loads a BERT-family encoder (all-MiniLM-L6-v2, say) from a directory
//! holding `config.json` and `model.safetensors` (or `pytorch_model.bin`) and returns the
//! last hidden state of every token; the version's processor tokenizes and pools. On the CPU
//! the forward pass is [`bert::CpuBert`] (sequences packed without padding, fused
//! element-wise steps); on a GPU it is candle-transformers' `BertModel`.
//!
//! Task `generate` loads a llama-family decoder from a GGUF file (SmolLM2, say) and
//! streams generated tokens, many sequences batched together step by step
//! ([`generate`]). This crate knows candle and the backend trait, and nothing of wasmtime
//! or HTTP.
#![deny(missing_docs)]

pub mod bert;
pub mod generate;
pub mod llama;
mod qmatmul;

pub use candle_core::Device;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType as CandleDType, Tensor as CandleTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use wasp_backend::{Backend, BackendError, BackendFactory, LoadContext, Result};
use wasp_core::{BackendSpec, ModelInput, ModelOutput, Tensor};

/// Loads `candle` backends.
#[derive(Debug, Default, Clone, Copy)]
pub struct CandleFactory;

impl BackendFactory for CandleFactory {
    fn kind(&self) -> &'static str {
        "candle"
    }

    fn load(&self, spec: &BackendSpec, context: &LoadContext) -> Result<Arc<dyn Backend>> {
        let BackendSpec::Candle(spec) = spec else {
            return Err(BackendError::Load(format!(
                "the candle factory cannot load a `{}` backend",
                spec.kind()
            )));
        };
        let device = device(&spec.device)?;
        let dir = resolve_model(&spec.model, &context.models_dir)?;
        match spec.task.as_str() {
            "embeddings" => Ok(Arc::new(BertEmbedder::load(&dir, device)?)),
            "generate" => {
                let limits = generate::EngineLimits {
                    max_running: spec.max_sequences.unwrap_or(16) as usize,
                    kv_cache_bytes: u64::from(spec.kv_cache_mib.unwrap_or(1024)) << 20,
                };
                Ok(Arc::new(generate::Generator::load(&dir, device, limits)?))
            }
            other => Err(BackendError::Load(format!("candle has no task `{other}`"))),
        }
    }
}

/// Whether this build can use CUDA devices.
pub const CUDA: bool = cfg!(feature = "cuda");

/// The device a spec names: `cpu`, `cuda:N` (or `cuda` for `cuda:0`), or `auto` (the
/// first GPU when this build has CUDA and the machine has one, else the CPU).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if CUDA && candle_core::utils::cuda_is_available() {
                cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(BackendError::Device(format!(
                "unknown device `{other}`: use `cpu`, `cuda:N` or `auto`"
            ))),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| BackendError::Device(format!("cannot open cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(BackendError::Device(format!(
        "cannot use cuda:{ordinal}: wasp was built without CUDA (build with `--features cuda`)"
    )))
}

/// Finds a model: `model` itself when it is a directory, else `models_dir/model`.
pub fn resolve_model(model: &str, models_dir: &Path) -> Result<PathBuf> {
    let direct = PathBuf::from(model);
    if direct.is_dir() {
        return Ok(direct);
    }
    let cached = models_dir.join(model);
    if !model.contains("..") && cached.is_dir() {
        return Ok(cached);
    }
    Err(BackendError::Load(format!(
        "no model `{model}`: it is not a directory, and {} does not exist \
         (scripts/fetch-model fetches all-MiniLM-L6-v2 there)",
        cached.display()
    )))
}

/// How a [`BertEmbedder`] runs its forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertEngine {
    /// [`bert::CpuBert`]: packed sequences, fused element-wise steps (CPU only; the default
    /// there).
    Packed,
    /// candle-transformers' `BertModel` on the spec's device (the default on a GPU).
    Candle,
}

enum Encoder {
    Packed(bert::CpuBert),
    Candle(BertModel),
}

/// A BERT-family sentence encoder: token ids in, last hidden states out.
pub struct BertEmbedder {
    model: Encoder,
    device: Device,
    name: String,
    hidden: usize,
    max_positions: usize,
}

fn load_err(what: &str) -> impl FnOnce(candle_core::Error) -> BackendError + '_ {
    move |e| BackendError::Load(format!("{what}: {e}"))
}

fn infer_err(e: candle_core::Error) -> BackendError {
    BackendError::Inference(e.to_string())
}

impl BertEmbedder {
    /// Loads `config.json` and the weights from `dir` onto `device` (blocking), with the
    /// packed engine on the CPU when it runs the config (see [`bert::CpuBert::runs`]) and
    /// candle's model otherwise.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::open(dir, device, None)
    }

    /// Loads the model with the given engine (`Packed` needs the CPU).
    pub fn load_engine(dir: &Path, device: Device, engine: BertEngine) -> Result<Self> {
        if engine == BertEngine::Packed && !device.is_cpu() {
            return Err(BackendError::Load(
                "the packed BERT engine runs on the CPU only".into(),
            ));
        }
        Self::open(dir, device, Some(engine))
    }

    /// The engine this model runs on.
    pub fn engine(&self) -> BertEngine {
        match self.model {
            Encoder::Packed(_) => BertEngine::Packed,
            Encoder::Candle(_) => BertEngine::Candle,
        }
    }

    fn open(dir: &Path, device: Device, engine: Option<BertEngine>) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            BackendError::Load(format!("cannot read {}: {e}", config_path.display()))
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| {
            BackendError::Load(format!(
                "{} is not a BERT config: {e}",
                config_path.display()
            ))
        })?;
        let safetensors = dir.join("model.safetensors");
        let pytorch = dir.join("pytorch_model.bin");
        let vb = if safetensors.exists() {
            // Read, not mmap: the file is tens of MB, and a read needs no `unsafe`.
            let bytes = std::fs::read(&safetensors).map_err(|e| {
                BackendError::Load(format!("cannot read {}: {e}", safetensors.display()))
            })?;
            VarBuilder::from_buffered_safetensors(bytes, CandleDType::F32, &device)
                .map_err(load_err("model.safetensors"))?
        } else if pytorch.exists() {
            VarBuilder::from_pth(&pytorch, CandleDType::F32, &device)
                .map_err(load_err("pytorch_model.bin"))?
        } else {
            return Err(BackendError::Load(format!(
                "{} has neither model.safetensors nor pytorch_model.bin",
                dir.display()
            )));
        };
        let engine = engine.unwrap_or(if device.is_cpu() && bert::CpuBert::runs(&config) {
            BertEngine::Packed
        } else {
            BertEngine::Candle
        });
        let model = match engine {
            BertEngine::Packed => Encoder::Packed(
                bert::CpuBert::load(vb, &config)
                    .map_err(|e| BackendError::Load(format!("BERT weights: {e}")))?,
            ),
            BertEngine::Candle => {
                Encoder::Candle(BertModel::load(vb, &config).map_err(load_err("BERT weights"))?)
            }
        };
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        tracing::info!(model = %name, device = ?device, ?engine, "loaded BERT encoder");
        Ok(Self {
            model,
            device,
            name,
            hidden: config.hidden_size,
            max_positions: config.max_position_embeddings,
        })
    }
}

/// One input's token tensors, checked.
struct Sequences {
    rows: usize,
    len: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
    types: Vec<i64>,
}

fn sequences(input: &ModelInput, index: usize) -> Result<Sequences> {
    let field = |name: &str| format!("inputs[{index}].{name}");
    let ids_tensor = input.tensor("input_ids").ok_or_else(|| {
        BackendError::bad_input("input has no `input_ids` tensor", field("input_ids"))
    })?;
    let [rows, len] = ids_tensor.shape[..] else {
        return Err(BackendError::bad_input(
            format!(
                "`input_ids` must have shape [batch, sequence], not {:?}",
                ids_tensor.shape
            ),
            field("input_ids"),
        ));
    };
    let read = |name: &str, default: i64| -> Result<Vec<i64>> {
        match input.tensor(name) {
            None => Ok(vec![default; (rows * len) as usize]),
            Some(t) if t.shape != ids_tensor.shape => Err(BackendError::bad_input(
                format!(
                    "`{name}` has shape {:?}, `input_ids` {:?}",
                    t.shape, ids_tensor.shape
                ),
                field(name),
            )),
            Some(t) => t
                .to_i64()
                .map_err(|e| BackendError::bad_input(e.to_string(), field(name))),
        }
    };
    Ok(Sequences {
        rows: rows as usize,
        len: len as usize,
        ids: read("input_ids", 0)?,
        mask: read("attention_mask", 1)?,
        types: read("token_type_ids", 0)?,
    })
}

impl Backend for BertEmbedder {
    fn rows(&self, input: &ModelInput) -> usize {
        input
            .tensor("input_ids")
            .and_then(|t| t.shape.first())
            .map_or(1, |&n| n as usize)
    }

    fn describe(&self) -> String {
        format!("{} on {:?}", self.name, self.device)
    }

    fn signature(&self) -> Option<wasp_backend::Signature> {
        use wasp_backend::TensorSpec;
        let hidden = i64::try_from(self.hidden).unwrap_or(-1);
        Some(wasp_backend::Signature {
            inputs: vec![
                TensorSpec::new("input_ids", "INT64", &[-1, -1]),
                TensorSpec::new("attention_mask", "INT64", &[-1, -1]).optional(),
                TensorSpec::new("token_type_ids", "INT64", &[-1, -1]).optional(),
            ],
            outputs: vec![TensorSpec::new(
                "last_hidden_state",
                "FP32",
                &[-1, -1, hidden],
            )],
        })
    }

    fn infer_batch(&self, inputs: &[ModelInput]) -> Result<Vec<ModelOutput>> {
        let parsed = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| sequences(input, i))
            .collect::<Result<Vec<_>>>()?;
        let width = parsed.iter().map(|s| s.len).max().unwrap_or(0);
        let total: usize = parsed.iter().map(|s| s.rows).sum();
        if width == 0 || total == 0 {
            return Ok(inputs.iter().map(|_| empty_output(self.hidden)).collect());
        }
        if width > self.max_positions {
            return Err(BackendError::bad_input(
                format!(
                    "sequences of {width} tokens exceed the model's {} positions",
                    self.max_positions
                ),
                "input_ids",
            ));
        }
        match &self.model {
            Encoder::Packed(model) => packed(model, &parsed, self.hidden),
            Encoder::Candle(model) => self.candle(model, &parsed, width, total),
        }
    }
}

/// The packed engine: every row of every input, unpadded; each input's rows come back as
/// one contiguous run of the output.
fn packed(model: &bert::CpuBert, parsed: &[Sequences], h: usize) -> Result<Vec<ModelOutput>> {
    let mut rows = Vec::new();
    let mut owner = Vec::new();
    for (i, s) in parsed.iter().enumerate() {
        for row in 0..s.rows {
            let span = row * s.len..(row + 1) * s.len;
            rows.push(bert::Sequence {
                ids: &s.ids[span.clone()],
                types: &s.types[span.clone()],
                mask: &s.mask[span],
            });
            owner.push(i);
        }
    }
    let values = model.forward(&rows).map_err(|e| match e {
        bert::BertError::Input {
            message,
            field,
            row,
        } => {
            let index = owner.get(row).copied().unwrap_or(0);
            BackendError::bad_input(message, format!("inputs[{index}].{field}"))
        }
        other => BackendError::Inference(other.to_string()),
    })?;
    let mut outputs = Vec::with_capacity(parsed.len());
    let mut at = 0;
    for s in parsed {
        let n = s.rows * s.len * h;
        outputs.push(hidden_output(
            vec![s.rows as u64, s.len as u64, h as u64],
            &values[at..at + n],
        ));
        at += n;
    }
    Ok(outputs)
}

fn hidden_output(shape: Vec<u64>, data: &[f32]) -> ModelOutput {
    ModelOutput {
        tensors: vec![Tensor::from_f32("last_hidden_state", shape, data)],
        metadata: None,
        index: 0,
        last: true,
    }
}

impl BertEmbedder {
    /// candle's model: every row right-padded to the longest in the batch (mask 0 on
    /// padding).
    fn candle(
        &self,
        model: &BertModel,
        parsed: &[Sequences],
        width: usize,
        total: usize,
    ) -> Result<Vec<ModelOutput>> {
        let mut ids = Vec::with_capacity(total * width);
        let mut mask = Vec::with_capacity(total * width);
        let mut types = Vec::with_capacity(total * width);
        for s in parsed {
            for row in 0..s.rows {
                let span = row * s.len..(row + 1) * s.len;
                let pad = width - s.len;
                for (dst, src) in [
                    (&mut ids, &s.ids),
                    (&mut mask, &s.mask),
                    (&mut types, &s.types),
                ] {
                    dst.extend(
                        src[span.clone()]
                            .iter()
                            .map(|&v| v.clamp(0, u32::MAX as i64) as u32),
                    );
                    dst.extend(std::iter::repeat_n(0u32, pad));
                }
            }
        }
        let tensor = |data: Vec<u32>| CandleTensor::from_vec(data, (total, width), &self.device);
        let hidden = model
            .forward(
                &tensor(ids).map_err(infer_err)?,
                &tensor(types).map_err(infer_err)?,
                Some(&tensor(mask).map_err(infer_err)?),
            )
            .map_err(infer_err)?;
        let values: Vec<f32> = hidden
            .to_dtype(CandleDType::F32)
            .and_then(|h| h.flatten_all())
            .and_then(|h| h.to_vec1())
            .map_err(infer_err)?;

        // Split back: each input gets its rows, cut to its own sequence length.
        let h = self.hidden;
        let mut outputs = Vec::with_capacity(parsed.len());
        let mut row0 = 0;
        for s in parsed {
            let mut data = Vec::with_capacity(s.rows * s.len * h);
            for row in row0..row0 + s.rows {
                let start = row * width * h;
                data.extend_from_slice(&values[start..start + s.len * h]);
            }
            row0 += s.rows;
            outputs.push(hidden_output(
                vec![s.rows as u64, s.len as u64, h as u64],
                &data,
            ));
        }
        Ok(outputs)
    }
}

fn empty_output(hidden: usize) -> ModelOutput {
    hidden_output(vec![0, 0, hidden as u64], &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(device("tpu:0"), Err(BackendError::Device(_))));
        if !CUDA {
            let err = device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("built without CUDA"), "{err}");
            assert!(matches!(device("auto"), Ok(Device::Cpu)));
        }
    }

    #[test]
    fn missing_models_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_model("nope", dir.path()).unwrap_err().to_string();
        assert!(err.contains("no model `nope`"), "{err}");
        std::fs::create_dir(dir.path().join("m")).unwrap();
        assert_eq!(
            resolve_model("m", dir.path()).unwrap(),
            dir.path().join("m")
        );
        let err = BertEmbedder::load(&dir.path().join("m"), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}

//! Model files (GGUF, Hugging Face directories) and the forward pass.
//!
//! [`load`] picks the loader from the path: a file is read as GGUF (`gguf`), a directory as a
//! Hugging Face checkpoint (`hf`). Both produce the same [`LlamaModel`] (llama and qwen2
//! architectures); the tokenizer and chat template come from the `prompt` crate, which reads
//! the same files without the weights.

mod gguf;
mod hf;
pub mod kv_pool;
pub mod llama;

use std::path::Path;

pub use kv_pool::CpuKvPool;
pub use llama::{LlamaModel, Logits, RopeStyle, StepInput};
use prompt::{ChatTemplate, LoadError, Tokenizer};

/// Architecture hyper-parameters, whichever file format they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama` or `qwen2`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// Rejects geometries the forward pass cannot run; `path` names the file in the error.
    fn check(&self, path: &Path) -> Result<(), ModelError> {
        let (heads, kv_heads, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let problem = if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            format!("{heads} attention heads are not a multiple of {kv_heads} KV heads")
        } else if hd == 0 || !hd.is_multiple_of(2) {
            format!(
                "head dim {hd} (hidden {}, {heads} heads) is not a positive even number",
                self.hidden_size
            )
        } else if self.vocab_size == 0 || self.num_layers == 0 || self.max_position_embeddings == 0
        {
            "vocab size, layer count and context length must be positive".to_string()
        } else {
            return Ok(());
        };
        Err(malformed(path, problem))
    }
}

/// Everything [`load`] reads from a model path.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Default served model name: the GGUF file stem or the directory name.
    pub name: String,
}

/// Architectures [`load`] accepts (the `general.architecture` / `model_type` spelling).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model path is missing, unreadable or malformed.
    #[error(transparent)]
    Files(#[from] LoadError),
    #[error("unsupported architecture \"{0}\" (supported: {list})", list = SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("invalid step input: {0}")]
    InvalidInput(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Loads a model: a `.gguf` file or a Hugging Face directory (config.json, safetensors,
/// tokenizer.json).
pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()).into());
    }
    if path.is_dir() {
        hf::load(path)
    } else {
        gguf::load(path)
    }
}

/// The lowercase architecture name if supported.
fn check_architecture(arch: &str) -> Result<String, ModelError> {
    let lower = arch.to_ascii_lowercase();
    if SUPPORTED_ARCHITECTURES.contains(&lower.as_str()) {
        Ok(lower)
    } else {
        // Named as the file spells it, so users can search for it.
        Err(ModelError::UnsupportedArchitecture(arch.to_string()))
    }
}

/// Checks a weight's shape against what the config implies.
fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<(), ModelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

fn malformed(path: &Path, reason: String) -> ModelError {
    LoadError::malformed(path, reason).into()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! The real default model, loaded once per test binary.

    use std::sync::OnceLock;

    pub use prompt::test_support::{gguf_path, scratch_dir};

    use super::LoadedModel;

    /// The SmolLM2 GGUF, or `None` (after saying so) when the file is not there.
    pub fn smollm() -> Option<&'static LoadedModel> {
        static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
        let model = MODEL.get_or_init(|| {
            let path = gguf_path();
            if !path.is_file() {
                return None;
            }
            Some(super::load(&path).expect("loading the default GGUF"))
        });
        if model.is_none() {
            eprintln!("SKIPPED: {} not found", gguf_path().display());
        }
        model.as_ref()
    }

    /// The default GGUF with every quantized tensor dequantized and stored as F16, in memory.
    /// Loaders turn F16 tensors into f32 matmuls, so this model runs without the per-row Q8
    /// quantization of activations that makes the Q4_1 model numerically chaotic.
    pub fn smollm_f16_gguf() -> Option<&'static [u8]> {
        static BYTES: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        let bytes = BYTES.get_or_init(|| {
            use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
            use candle_core::Device;
            let mut file = std::fs::File::open(gguf_path()).ok()?;
            let ct = gguf_file::Content::read(&mut file).unwrap();
            let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
            names.sort();
            let tensors: Vec<(&str, QTensor)> = names
                .into_iter()
                .map(|name| {
                    let t = ct.tensor(&mut file, name, &Device::Cpu).unwrap();
                    let t = match t.dtype() {
                        GgmlDType::F32 => t,
                        _ => {
                            QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::F16)
                                .unwrap()
                        }
                    };
                    (name.as_str(), t)
                })
                .collect();
            let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
            let metadata: Vec<(&str, &gguf_file::Value)> =
                ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let mut out = std::io::Cursor::new(Vec::new());
            gguf_file::write(&mut out, &metadata, &tensors).unwrap();
            Some(out.into_inner())
        });
        if bytes.is_none() {
            eprintln!("SKIPPED: {} not found", gguf_path().display());
        }
        bytes.as_deref()
    }

    /// The F16 variant of the default model, loaded through the GGUF loader.
    pub fn smollm_f16() -> Option<&'static LoadedModel> {
        static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let bytes = smollm_f16_gguf()?;
                let path = std::path::Path::new("SmolLM2-135M-Instruct.F16.gguf");
                Some(super::gguf::load_from(std::io::Cursor::new(bytes), path).unwrap())
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{scratch_dir, smollm};
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn loads_smollm_gguf() {
        let Some(m) = smollm() else { return };
        let expected = ModelConfig {
            architecture: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            intermediate_size: 1536,
            rope_theta: 100_000.0,
            rms_norm_eps: 9.999999747378752e-6,
            max_position_embeddings: 8192,
        };
        assert_eq!(m.config, expected);
        assert_eq!(m.name, "SmolLM2-135M-Instruct.Q4_1");
        assert!(m.chat_template.is_some());
        assert_eq!(m.tokenizer.eos_token_ids(), &[2]);
        assert_eq!(m.tokenizer.bos_token(), Some("<|im_start|>"));
        assert_eq!(m.tokenizer.eos_token(), Some("<|im_end|>"));
        let layout = m.model.kv_layout(10, 16);
        assert_eq!(
            (layout.num_layers, layout.num_kv_heads, layout.head_dim),
            (30, 3, 64)
        );
    }

    fn write_gguf(path: &Path, arch: &str, with_embedding: bool) {
        let md = [
            (
                "general.architecture",
                gguf_file::Value::String(arch.into()),
            ),
            (
                &format!("{arch}.embedding_length") as &str,
                gguf_file::Value::U32(8),
            ),
            (
                &format!("{arch}.attention.head_count"),
                gguf_file::Value::U32(2),
            ),
            (&format!("{arch}.block_count"), gguf_file::Value::U32(1)),
            (
                &format!("{arch}.feed_forward_length"),
                gguf_file::Value::U32(16),
            ),
            (&format!("{arch}.context_length"), gguf_file::Value::U32(32)),
            (
                &format!("{arch}.attention.layer_norm_rms_epsilon"),
                gguf_file::Value::F32(1e-5),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let embd = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let embd = QTensor::quantize(&embd, GgmlDType::F32).unwrap();
        let tensors: Vec<(&str, &QTensor)> = if with_embedding {
            vec![("token_embd.weight", &embd)]
        } else {
            vec![]
        };
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md, &tensors).unwrap();
    }

    #[test]
    fn load_errors_are_specific() {
        let dir = scratch_dir("agent-load-errors");
        let missing = dir.join("nope.gguf");
        assert!(
            matches!(load(&missing), Err(ModelError::Files(LoadError::NotFound(p))) if p == missing)
        );

        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"not a model at all").unwrap();
        assert!(matches!(
            load(&junk),
            Err(ModelError::Files(LoadError::NotGguf(_)))
        ));

        let mamba = dir.join("mamba.gguf");
        write_gguf(&mamba, "mamba", true);
        let err = load(&mamba).err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported architecture \"mamba\" (supported: llama, qwen2)"
        );

        let no_embd = dir.join("no-embd.gguf");
        write_gguf(&no_embd, "llama", false);
        assert!(
            matches!(load(&no_embd), Err(ModelError::MissingTensor(t)) if t == "token_embd.weight")
        );

        let no_layers = dir.join("no-layers.gguf");
        write_gguf(&no_layers, "llama", true);
        assert!(
            matches!(load(&no_layers), Err(ModelError::MissingTensor(t)) if t == "output_norm.weight")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

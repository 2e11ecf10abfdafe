//! Hugging Face checkpoint directories: `config.json`, `*.safetensors` (single file or sharded
//! through `model.safetensors.index.json`, loaded as f32), `tokenizer.json`, and the special
//! tokens / chat template of `tokenizer_config.json` (+ `generation_config.json`,
//! `chat_template.jinja`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::llama::{Layer, Linear, RmsNorm};
use super::{
    check_architecture, check_shape, malformed, served_name, ChatTemplate, LlamaModel, LoadedModel,
    ModelConfig, ModelError, RopeStyle, Tokenizer,
};

/// The `config.json` fields llama and qwen2 use.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    rope_scaling: Option<Value>,
    hidden_act: Option<String>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}

pub(super) fn load(dir: &Path) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    let hf: HfConfig = serde_json::from_str(&read_required(&config_path)?)
        .map_err(|e| malformed(&config_path, e.to_string()))?;
    let config = model_config(&hf, &config_path)?;
    let mut weights = Weights::load(dir)?;
    let model = load_weights(&mut weights, &config, &hf)?;
    let (tokenizer, chat_template) = load_tokenizer(dir)?;
    Ok(LoadedModel {
        config,
        model,
        tokenizer,
        chat_template,
        name: served_name(dir, false),
    })
}

fn model_config(hf: &HfConfig, path: &Path) -> Result<ModelConfig, ModelError> {
    let arch = match (&hf.model_type, hf.architectures.first()) {
        (Some(t), _) => t.clone(),
        (None, Some(a)) => match a.as_str() {
            "LlamaForCausalLM" => "llama".to_string(),
            "Qwen2ForCausalLM" => "qwen2".to_string(),
            other => other.to_string(),
        },
        (None, None) => {
            return Err(malformed(
                path,
                "neither model_type nor architectures is set".into(),
            ))
        }
    };
    let arch = check_architecture(&arch)?;
    if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(ModelError::Unsupported(format!("rope_scaling {scaling}")));
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(ModelError::Unsupported(format!(
            "hidden_act {act} (only silu)"
        )));
    }
    let num_heads = hf.num_attention_heads;
    let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(malformed(
            path,
            format!("{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads"),
        ));
    }
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if hf.hidden_size % num_heads == 0 => hf.hidden_size / num_heads,
        None => {
            return Err(malformed(
                path,
                format!(
                    "hidden_size {} is not a multiple of {num_heads} heads",
                    hf.hidden_size
                ),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(malformed(path, format!("odd head_dim {head_dim}")));
    }
    Ok(ModelConfig {
        architecture: arch,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        num_layers: hf.num_hidden_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: hf.intermediate_size,
        rope_theta: hf.rope_theta,
        rms_norm_eps: hf.rms_norm_eps,
        max_position_embeddings: hf.max_position_embeddings,
    })
}

fn load_weights(w: &mut Weights, c: &ModelConfig, hf: &HfConfig) -> Result<LlamaModel, ModelError> {
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let qkv_bias = c.architecture == "qwen2" || hf.attention_bias;
    let o_bias = hf.attention_bias;

    let embed = w.take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
    let lm_head = if hf.tie_word_embeddings {
        embed.clone()
    } else {
        w.take("lm_head.weight", &[c.vocab_size, hidden])?
    };
    let norm = RmsNorm::new(w.take("model.norm.weight", &[hidden])?, c.rms_norm_eps);
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| {
            let weight = w.take(&format!("{p}.{name}.weight"), &[out, inp])?;
            let bias = match bias {
                true => Some(w.take(&format!("{p}.{name}.bias"), &[out])?),
                false => None,
            };
            Ok::<_, ModelError>(Linear::new(QMatMul::Tensor(weight), bias))
        };
        let q = linear("self_attn.q_proj", q_dim, hidden, qkv_bias)?;
        let k = linear("self_attn.k_proj", kv_dim, hidden, qkv_bias)?;
        let v = linear("self_attn.v_proj", kv_dim, hidden, qkv_bias)?;
        let o = linear("self_attn.o_proj", hidden, q_dim, o_bias)?;
        let mut matmul = |name: &str, out: usize, inp: usize| {
            Ok::<_, ModelError>(QMatMul::Tensor(
                w.take(&format!("{p}.mlp.{name}.weight"), &[out, inp])?,
            ))
        };
        let gate = matmul("gate_proj", inter, hidden)?;
        let up = matmul("up_proj", inter, hidden)?;
        let down = matmul("down_proj", hidden, inter)?;
        let mut norm = |name: &str| {
            Ok::<_, ModelError>(RmsNorm::new(
                w.take(&format!("{p}.{name}.weight"), &[hidden])?,
                c.rms_norm_eps,
            ))
        };
        layers.push(Layer {
            attn_norm: norm("input_layernorm")?,
            ffn_norm: norm("post_attention_layernorm")?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    // HF checkpoints keep Q/K unpermuted: the half-split (NEOX) rotary form.
    LlamaModel::new(
        c,
        embed,
        layers,
        norm,
        QMatMul::Tensor(lm_head),
        RopeStyle::Neox,
    )
}

/// All tensors of the checkpoint, by name.
struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn load(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let json: Value = serde_json::from_str(&read_required(&index)?)
                .map_err(|e| malformed(&index, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| malformed(&index, "no weight_map object".into()))?;
            let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(ModelError::MissingFile(single));
        };
        let mut tensors = HashMap::new();
        for file in files {
            if !file.is_file() {
                return Err(ModelError::MissingFile(file));
            }
            let shard = candle_core::safetensors::load(&file, &Device::Cpu)
                .map_err(|e| malformed(&file, e.to_string()))?;
            tensors.extend(shard);
        }
        Ok(Self { tensors })
    }

    /// Removes a tensor, shape-checked and converted to f32.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        check_shape(name, t.dims(), shape)?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Tokenizer (`tokenizer.json`) plus special tokens and chat template from the side files.
fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>), ModelError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::MissingFile(tok_path));
    }
    let inner = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let token = |key: &str| -> Option<String> {
        match tc.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let bos = token("bos_token");
    let eos = token("eos_token");

    let mut eos_ids: Vec<u32> = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
    let gen = read_json_opt(&dir.join("generation_config.json"))?;
    let gen_eos = match gen.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    for id in gen_eos.into_iter().filter_map(|id| u32::try_from(id).ok()) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }

    let source = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    };
    let jinja = dir.join("chat_template.jinja");
    let source = match source {
        Some(s) => Some(s),
        None if jinja.is_file() => Some(read_required(&jinja)?),
        None => None,
    };
    let template = source
        .map(|s| ChatTemplate::new(&s, bos.clone(), eos.clone()))
        .transpose()?;
    Ok((Tokenizer::new(inner, eos_ids, bos, eos), template))
}

fn read_required(path: &Path) -> Result<String, ModelError> {
    if !path.is_file() {
        return Err(ModelError::MissingFile(path.to_path_buf()));
    }
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A JSON object file, or `null` when the file does not exist.
fn read_json_opt(path: &Path) -> Result<Value, ModelError> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&read_required(path)?).map_err(|e| malformed(path, e.to_string()))
}

//! Hugging Face checkpoint directories: `config.json` and `*.safetensors` (single file or sharded
//! through `model.safetensors.index.json`, loaded as f32); the tokenizer files through the
//! `prompt` crate.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use prompt::hf::read_required;
use prompt::LoadError;
use serde::Deserialize;
use serde_json::Value;

use super::llama::{Layer, Linear, RmsNorm};
use super::{
    check_architecture, check_shape, malformed, LlamaModel, LoadedModel, ModelConfig, ModelError,
    RopeStyle,
};

/// The `config.json` fields llama and qwen2 use.
#[derive(Deserialize)]
struct HfConfig {
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

/// The fields that name the architecture, read before the rest: another architecture's
/// config lacks our fields, and the error must name the architecture, not a missing field.
#[derive(Deserialize)]
struct ArchFields {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
}

pub(super) fn load(dir: &Path) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    let text = read_required(&config_path)?;
    let names: ArchFields =
        serde_json::from_str(&text).map_err(|e| malformed(&config_path, e.to_string()))?;
    let arch = architecture(&names, &config_path)?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| malformed(&config_path, e.to_string()))?;
    let config = model_config(&hf, arch, &config_path)?;
    let mut weights = Weights::load(dir)?;
    let model = load_weights(&mut weights, &config, &hf)?;
    let text = prompt::load_hf(dir)?;
    Ok(LoadedModel {
        config,
        model,
        tokenizer: text.tokenizer,
        chat_template: text.chat_template,
        name: text.name,
    })
}

/// The supported architecture `config.json` names (`model_type`, else the first of
/// `architectures`).
fn architecture(names: &ArchFields, path: &Path) -> Result<String, ModelError> {
    let arch = match (&names.model_type, names.architectures.first()) {
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
    check_architecture(&arch)
}

fn model_config(hf: &HfConfig, arch: String, path: &Path) -> Result<ModelConfig, ModelError> {
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
    // 0 when the heads do not split `hidden_size`; ModelConfig::check reports it.
    let head_dim = hf
        .head_dim
        .unwrap_or(match hf.hidden_size.checked_div(num_heads) {
            Some(d) if d * num_heads == hf.hidden_size => d,
            _ => 0,
        });
    let config = ModelConfig {
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
    };
    config.check(path)?;
    Ok(config)
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
    let norm = RmsNorm::new(w.take("model.norm.weight", &[hidden])?, c.rms_norm_eps)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| {
            let weight = w.take(&format!("{p}.{name}.weight"), &[out, inp])?;
            let bias = match bias {
                true => Some(w.take(&format!("{p}.{name}.bias"), &[out])?),
                false => None,
            };
            Linear::new(QMatMul::Tensor(weight), bias)
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
            RmsNorm::new(
                w.take(&format!("{p}.{name}.weight"), &[hidden])?,
                c.rms_norm_eps,
            )
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
            return Err(LoadError::MissingFile(single).into());
        };
        let mut tensors = HashMap::new();
        for file in files {
            if !file.is_file() {
                return Err(LoadError::MissingFile(file).into());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{scratch_dir, smollm};
    use crate::model::Logits;
    use crate::model::StepInput;
    use candle_nn::VarBuilder;
    use kernels::{CpuKvCache, KvDtype, SeqAttn};
    use serde_json::json;

    const VOCAB: usize = 512;
    const HIDDEN: usize = 64;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const INTER: usize = 96;
    const LAYERS: usize = 2;

    /// Writes a tiny random checkpoint of `arch` (tokenizer taken from the GGUF) into `dir`.
    fn write_checkpoint(dir: &Path, arch: &str, tied: bool) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let hd = HIDDEN / HEADS;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
            ("model.norm.weight".into(), vec![HIDDEN]),
        ];
        if !tied {
            shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
        }
        for i in 0..LAYERS {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", vec![HEADS * hd, HIDDEN]),
                ("self_attn.k_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
                ("self_attn.v_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
                ("self_attn.o_proj.weight", vec![HIDDEN, HEADS * hd]),
                ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
                ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
                ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
                ("input_layernorm.weight", vec![HIDDEN]),
                ("post_attention_layernorm.weight", vec![HIDDEN]),
            ] {
                shapes.push((format!("{p}.{name}"), shape));
            }
            if arch == "qwen2" {
                shapes.push((format!("{p}.self_attn.q_proj.bias"), vec![HEADS * hd]));
                shapes.push((format!("{p}.self_attn.k_proj.bias"), vec![KV_HEADS * hd]));
                shapes.push((format!("{p}.self_attn.v_proj.bias"), vec![KV_HEADS * hd]));
            }
        }
        let tensors: HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.contains("norm") {
                    (Tensor::randn(0f32, 0.1, shape, &dev).unwrap() + 1.0).unwrap()
                } else {
                    Tensor::randn(0f32, 0.2, shape, &dev).unwrap()
                };
                (name, t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let config = json!({
            "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": arch, "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tied, "hidden_act": "silu", "rope_scaling": null,
            // qwen2 oracle config fields
            "sliding_window": 64, "max_window_layers": LAYERS, "use_sliding_window": false,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        tensors
    }

    /// tokenizer.json serialised from the GGUF tokenizer, plus the side files.
    fn write_tokenizer_files(dir: &Path) -> bool {
        let Some(m) = smollm() else { return false };
        m.tokenizer
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        let tc = json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
            ],
        });
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 0]}"#,
        )
        .unwrap();
        true
    }

    /// Our paged forward (prefill + 3 decode steps) against a candle-transformers reference.
    fn check_against(dir: &Path, mut reference: impl FnMut(&[u32], usize) -> Vec<f32>) -> f32 {
        let loaded = crate::model::load(dir).unwrap();
        let model = &loaded.model;
        let block_size = 4;
        let mut cache = CpuKvCache::new(model.kv_layout(8, block_size), KvDtype::F32);
        let table = [5u32, 2, 7, 0];
        let prompt = [1u32, 100, 200, 300, 400, 17, 5, 511, 42];
        let mut worst = 0f32;
        let mut fed: Vec<u32> = vec![];
        for (i, chunk) in [&prompt[..], &[7], &[300], &[9]].into_iter().enumerate() {
            let start = fed.len();
            fed.extend_from_slice(chunk);
            let positions: Vec<usize> = (start..fed.len()).collect();
            let slots: Vec<usize> = positions
                .iter()
                .map(|&p| table[p / block_size] as usize * block_size + p % block_size)
                .collect();
            let seqs = [SeqAttn {
                block_table: &table,
                context_len: fed.len(),
                query_start: 0,
                query_len: chunk.len(),
            }];
            let input = StepInput {
                token_ids: chunk,
                positions: &positions,
                slots: &slots,
                seqs: &seqs,
                logits_rows: &[chunk.len() - 1],
                hidden_rows: &[],
            };
            let mut logits = Logits::default();
            model.forward(&input, &mut cache, &mut logits).unwrap();
            let ours = logits.row(0);
            let theirs = reference(chunk, start);
            assert_eq!(ours.len(), VOCAB, "step {i}");
            let diff = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            worst = worst.max(diff);
        }
        worst
    }

    #[test]
    fn tiny_llama_matches_candle_llama() {
        let dir = scratch_dir("agent-hf-llama");
        if !write_tokenizer_files(&dir) {
            return;
        }
        let tensors = write_checkpoint(&dir, "llama", false);
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded.config.architecture, "llama");
        assert_eq!(loaded.name, dir.file_name().unwrap().to_string_lossy());
        assert_eq!(loaded.tokenizer.eos_token_ids(), &[2, 0]);
        assert_eq!(loaded.tokenizer.bos_token(), Some("<|im_start|>"));
        let rendered = loaded.chat_template.as_ref().unwrap();
        let text = rendered
            .render(&json!([{"role": "user", "content": "hi"}]), true, None)
            .unwrap();
        assert_eq!(text, "<|im_start|>hi<|im_end|>");

        use candle_transformers::models::llama as reference;
        let cfg: reference::LlamaConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let cfg = cfg.into_config(false);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let llama = reference::Llama::load(vb, &cfg).unwrap();
        let mut cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
        let worst = check_against(&dir, |ids, pos| {
            let x = Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            llama
                .forward(&x, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        });
        eprintln!("tiny llama vs candle llama: max |logit diff| {worst}");
        assert!(worst < 1e-4, "{worst}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tiny_qwen2_matches_candle_qwen2() {
        let dir = scratch_dir("agent-hf-qwen2");
        if !write_tokenizer_files(&dir) {
            return;
        }
        let tensors = write_checkpoint(&dir, "qwen2", true);
        use candle_transformers::models::qwen2 as reference;
        let cfg: reference::Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let mut qwen = reference::ModelForCausalLM::new(&cfg, vb).unwrap();
        let worst = check_against(&dir, |ids, pos| {
            let x = Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = qwen.forward(&x, pos).unwrap();
            logits.flatten_all().unwrap().to_vec1().unwrap()
        });
        eprintln!("tiny qwen2 vs candle qwen2: max |logit diff| {worst}");
        assert!(worst < 1e-4, "{worst}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hf_load_errors() {
        let dir = scratch_dir("agent-hf-errors");
        let config = dir.join("config.json");
        let err = load(&dir).err().unwrap();
        assert!(
            matches!(&err, ModelError::Files(LoadError::MissingFile(p)) if *p == config),
            "{err}"
        );

        std::fs::write(&config, "{ not json").unwrap();
        assert!(matches!(
            load(&dir),
            Err(ModelError::Files(LoadError::MalformedConfig { .. }))
        ));

        let mistral = json!({"model_type": "mistral", "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2});
        std::fs::write(&config, mistral.to_string()).unwrap();
        let err = load(&dir).err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported architecture \"mistral\" (supported: llama, qwen2)"
        );
        // An architecture whose config has none of our fields still names itself.
        let mamba = json!({"architectures": ["MambaForCausalLM"], "d_model": 768});
        std::fs::write(&config, mamba.to_string()).unwrap();
        let err = load(&dir).err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported architecture \"MambaForCausalLM\" (supported: llama, qwen2)"
        );

        let bad_heads = json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_key_value_heads": 2});
        std::fs::write(&config, bad_heads.to_string()).unwrap();
        let err = load(&dir).err().unwrap();
        assert!(
            err.to_string()
                .contains("3 attention heads are not a multiple of 2 KV heads"),
            "{err}"
        );

        // Valid config, no weights.
        write_checkpoint(&dir, "llama", true);
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let err = load(&dir).err().unwrap();
        assert!(
            matches!(&err, ModelError::Files(LoadError::MissingFile(p)) if p.ends_with("model.safetensors")),
            "{err}"
        );

        // Weights without a tokenizer.
        write_checkpoint(&dir, "llama", true);
        let err = load(&dir).err().unwrap();
        assert!(
            matches!(&err, ModelError::Files(LoadError::MissingFile(p)) if p.ends_with("tokenizer.json")),
            "{err}"
        );

        // qwen2 needs q/k/v biases.
        write_checkpoint(&dir, "llama", true);
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        cfg["model_type"] = json!("qwen2");
        std::fs::write(&config, cfg.to_string()).unwrap();
        let err = load(&dir).err().unwrap();
        assert!(
            matches!(&err, ModelError::MissingTensor(t) if t == "model.layers.0.self_attn.q_proj.bias"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

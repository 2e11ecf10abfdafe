//! GGUF loading: hyper-parameters from `<arch>.*` metadata and weights kept quantized (as
//! candle-transformers' `quantized_llama::from_gguf` does), through candle's GGUF reader; the
//! tokenizer and chat template from `tokenizer.*` metadata, through the `prompt` crate.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use prompt::LoadError;

use super::llama::{Layer, Linear, RmsNorm};
use super::{
    check_architecture, check_shape, malformed, LlamaModel, LoadedModel, ModelConfig, ModelError,
    RopeStyle,
};

pub(super) fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    let file = File::open(path).map_err(LoadError::io(path))?;
    load_from(BufReader::new(file), path)
}

/// Checks the GGUF magic and reads the header (metadata and tensor infos, no tensor data).
fn read_content<R: Read + Seek>(
    reader: &mut R,
    path: &Path,
) -> Result<gguf_file::Content, ModelError> {
    prompt::gguf::check_magic(reader, path)?;
    gguf_file::Content::read(reader).map_err(|e| malformed(path, e.to_string()))
}

/// Loads a GGUF from any reader; `path` names it in errors and gives the served name.
pub(super) fn load_from<R: Read + Seek>(
    mut reader: R,
    path: &Path,
) -> Result<LoadedModel, ModelError> {
    let ct = read_content(&mut reader, path)?;
    let meta = Meta { ct: &ct, path };

    let arch = check_architecture(meta.string("general.architecture")?)?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let num_heads = meta.usize(&key("attention.head_count"))?;
    let num_kv_heads = meta
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    // 0 when the heads do not split `hidden`; ModelConfig::check reports it.
    let head_dim = match hidden.checked_div(num_heads) {
        Some(d) if d * num_heads == hidden => d,
        _ => 0,
    };
    let embd_rows = match ct.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => return Err(ModelError::MissingTensor("token_embd.weight".into())),
    };
    let config = ModelConfig {
        architecture: arch.clone(),
        vocab_size: meta.opt_usize(&key("vocab_size"))?.unwrap_or(embd_rows),
        hidden_size: hidden,
        num_layers: meta.usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        rope_theta: meta.opt_float(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
        rms_norm_eps: meta.float(&key("attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: meta.usize(&key("context_length"))?,
    };
    config.check(path)?;
    let rope_dim = meta
        .opt_usize(&key("rope.dimension_count"))?
        .unwrap_or(config.head_dim);
    if rope_dim != config.head_dim {
        return Err(ModelError::Unsupported(format!(
            "partial rotary embedding (rope dim {rope_dim}, head dim {})",
            config.head_dim
        )));
    }
    let mut w = Weights { ct: &ct, reader };
    let model = load_weights(&mut w, &config)?;
    // The text side: the same header again, read by the prompt crate (metadata only).
    w.reader
        .seek(SeekFrom::Start(0))
        .map_err(LoadError::io(path))?;
    let text = prompt::load_gguf(&mut w.reader, path)?;
    Ok(LoadedModel {
        config,
        model,
        tokenizer: text.tokenizer,
        chat_template: text.chat_template,
        name: text.name,
    })
}

fn load_weights<R: Read + Seek>(
    w: &mut Weights<R>,
    c: &ModelConfig,
) -> Result<LlamaModel, ModelError> {
    let (hidden, hd) = (c.hidden_size, c.head_dim);
    let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
    let qwen2 = c.architecture == "qwen2";

    let embd_q = w.get("token_embd.weight", &[c.vocab_size, hidden])?;
    let embed = embd_q.dequantize(&Device::Cpu)?;
    // Tied LM head: reuse the quantized embedding, as quantized_llama does.
    let lm_head = if w.has("output.weight") {
        w.get("output.weight", &[c.vocab_size, hidden])?
    } else {
        embd_q
    };
    let norm = RmsNorm::new(w.dense("output_norm.weight", &[hidden])?, c.rms_norm_eps)?;

    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        // qwen2 always has q/k/v biases; llama GGUFs may carry them too.
        let mut linear = |name: &str, out: usize, inp: usize, bias_required: bool| {
            let weight = QMatMul::from_qtensor(w.get(&format!("{p}.{name}.weight"), &[out, inp])?)?;
            let bias_name = format!("{p}.{name}.bias");
            let bias = if bias_required || w.has(&bias_name) {
                Some(w.dense(&bias_name, &[out])?)
            } else {
                None
            };
            Linear::new(weight, bias)
        };
        let q = linear("attn_q", q_dim, hidden, qwen2)?;
        let k = linear("attn_k", kv_dim, hidden, qwen2)?;
        let v = linear("attn_v", kv_dim, hidden, qwen2)?;
        let o = linear("attn_output", hidden, q_dim, false)?;
        let mut matmul = |name: &str, out: usize, inp: usize| {
            Ok::<_, ModelError>(QMatMul::from_qtensor(
                w.get(&format!("{p}.{name}.weight"), &[out, inp])?,
            )?)
        };
        let gate = matmul("ffn_gate", c.intermediate_size, hidden)?;
        let up = matmul("ffn_up", c.intermediate_size, hidden)?;
        let down = matmul("ffn_down", hidden, c.intermediate_size)?;
        layers.push(Layer {
            attn_norm: RmsNorm::new(
                w.dense(&format!("{p}.attn_norm.weight"), &[hidden])?,
                c.rms_norm_eps,
            )?,
            q,
            k,
            v,
            o,
            ffn_norm: RmsNorm::new(
                w.dense(&format!("{p}.ffn_norm.weight"), &[hidden])?,
                c.rms_norm_eps,
            )?,
            gate,
            up,
            down,
        });
    }
    // llama.cpp permutes llama's Q/K rows for the interleaved rotary form; qwen2 is NEOX.
    let rope = if qwen2 {
        RopeStyle::Neox
    } else {
        RopeStyle::Interleaved
    };
    LlamaModel::new(
        c,
        embed,
        layers,
        norm,
        QMatMul::from_qtensor(lm_head)?,
        rope,
    )
}

/// Tensor reader over an open GGUF.
struct Weights<'a, R> {
    ct: &'a gguf_file::Content,
    reader: R,
}

impl<R: Read + Seek> Weights<'_, R> {
    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    /// A tensor as stored (quantized or not), shape-checked.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<QTensor, ModelError> {
        if !self.has(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        let t = self.ct.tensor(&mut self.reader, name, &Device::Cpu)?;
        check_shape(name, t.shape().dims(), shape)?;
        Ok(t)
    }

    /// A tensor dequantized to f32 (norms, biases).
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        Ok(self.get(name, shape)?.dequantize(&Device::Cpu)?)
    }
}

/// Typed access to GGUF metadata, with errors naming the file and key.
struct Meta<'a> {
    ct: &'a gguf_file::Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        self.ct
            .metadata
            .get(key)
            .ok_or_else(|| malformed(self.path, format!("missing metadata key {key}")))
    }

    fn string(&self, key: &str) -> Result<&str, ModelError> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| malformed(self.path, format!("{key}: {e}")))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        let v = self.get(key)?;
        int_value(v)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| malformed(self.path, format!("{key}: expected a count, got {v:?}")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.ct.metadata.get(key) {
            Some(_) => self.usize(key).map(Some),
            None => Ok(None),
        }
    }

    fn float(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.get(key)?;
        match v {
            gguf_file::Value::F32(x) => Ok(f64::from(*x)),
            gguf_file::Value::F64(x) => Ok(*x),
            other => int_value(other).map(|n| n as f64).ok_or_else(|| {
                malformed(self.path, format!("{key}: expected a number, got {v:?}"))
            }),
        }
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.ct.metadata.get(key) {
            Some(_) => self.float(key).map(Some),
            None => Ok(None),
        }
    }
}

/// Any GGUF integer type as i64 (writers differ in the integer width they use).
fn int_value(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => Some((*x).into()),
        V::I8(x) => Some((*x).into()),
        V::U16(x) => Some((*x).into()),
        V::I16(x) => Some((*x).into()),
        V::U32(x) => Some((*x).into()),
        V::I32(x) => Some((*x).into()),
        V::U64(x) => i64::try_from(*x).ok(),
        V::I64(x) => Some(*x),
        _ => None,
    }
}

//! The independent reference: candle-transformers' `quantized_llama` on the same GGUF, run
//! in-process as in candle's example (whole-prompt forward, then one token per step, argmax).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

pub struct Oracle {
    model: ModelWeights,
    device: Device,
}

/// The result of one greedy decode.
#[derive(Debug, Clone)]
pub struct Greedy {
    pub tokens: Vec<u32>,
    /// `log_softmax` of the logits that chose `tokens[0]`.
    pub first_logprobs: Vec<f32>,
    /// Time of the prompt forward (which yields the first token).
    pub prefill_time: Duration,
    /// Time of the remaining one-token steps.
    pub decode_time: Duration,
}

impl Oracle {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("reading GGUF header of {}", path.display()))?;
        let device = Device::Cpu;
        let model = ModelWeights::from_gguf(content, &mut file, &device)?;
        Ok(Self { model, device })
    }

    /// Greedy decoding of `steps` tokens after `prompt` (end-of-sequence is not special).
    pub fn greedy(&mut self, prompt: &[u32], steps: usize) -> anyhow::Result<Greedy> {
        anyhow::ensure!(!prompt.is_empty(), "empty prompt");
        self.model.clear_kv_cache();
        let start = Instant::now();
        let mut logits = self.forward(prompt, 0)?;
        let prefill_time = start.elapsed();
        let first_logprobs = log_softmax(&logits);
        let start = Instant::now();
        let mut tokens = Vec::with_capacity(steps);
        for step in 0..steps {
            let next = argmax(&logits);
            tokens.push(next);
            if step + 1 < steps {
                logits = self.forward(&[next], prompt.len() + step)?;
            }
        }
        Ok(Greedy {
            tokens,
            first_logprobs,
            prefill_time,
            decode_time: start.elapsed(),
        })
    }

    fn forward(&mut self, ids: &[u32], pos: usize) -> anyhow::Result<Vec<f32>> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.model.forward(&input, pos)?;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
}

/// The GGUF's token embedding (`token_embd.weight`, which this model's tied LM head is),
/// dequantized: `[vocab, hidden]` row-major, and `hidden`.
pub fn token_embeddings(path: &Path) -> anyhow::Result<(Vec<f32>, usize)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)?;
    let device = Device::Cpu;
    let weights = content
        .tensor(&mut file, "token_embd.weight", &device)?
        .dequantize(&device)?;
    let (_, hidden) = weights.dims2()?;
    Ok((weights.flatten_all()?.to_vec1::<f32>()?, hidden))
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax`, accumulated in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&l| (l as f64 - log_z) as f32).collect()
}

/// The `k` largest values with their indices, largest first.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u32, *v))
        .collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn argmax_and_top_k() {
        let v = [0.5, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(argmax(&v), 1);
        assert_eq!(top_k(&v, 3), vec![(1, 3.0), (3, 3.0), (4, 2.0)]);
    }
}

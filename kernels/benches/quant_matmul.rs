//! Quantized-matmul benchmark: GMAC/s of [`kernels::matmul_many`] on the default model's shapes
//! (SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads of 64, vocab 49152), at 1 and 16 activation
//! rows, with the weights of all 30 layers distinct (streamed from memory each step, as in the
//! model) and with one layer's weights repeated (cache-resident: the kernel's compute ceiling).
//!
//! cargo bench -p kernels --bench quant_matmul -- [--rounds R]
//! (AGENT_CPU_THREADS=1 for one core.)

mod common;

use std::time::Instant;

use common::median;

use half::f16;
use kernels::{matmul_many, BlockFormat, QuantMatrix};
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 576;
const MLP: usize = 1536;
const KV: usize = 192;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;

/// Random weights in GGUF block layout: small positive scales, negative minimums.
fn matrix(
    rng: &mut rand::rngs::StdRng,
    format: BlockFormat,
    rows: usize,
    cols: usize,
) -> QuantMatrix {
    let blocks = rows * cols / 32;
    let mut data = Vec::with_capacity(blocks * format.block_bytes());
    for _ in 0..blocks {
        data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.02)).to_le_bytes());
        match format {
            BlockFormat::Q4_1 => {
                data.extend_from_slice(&f16::from_f32(rng.random_range(-0.1..0.0)).to_le_bytes());
                data.extend((0..16).map(|_| rng.random::<u8>()));
            }
            BlockFormat::Q8_0 => data.extend((0..32).map(|_| rng.random::<u8>())),
        }
    }
    QuantMatrix::from_gguf_blocks(format, rows, cols, &data).expect("valid shapes")
}

/// One layer's projections, grouped as the forward pass calls them (shared inputs together).
struct Layer {
    qkv: [QuantMatrix; 3],
    o: QuantMatrix,
    gate_up: [QuantMatrix; 2],
    down: QuantMatrix,
}

impl Layer {
    fn new(rng: &mut rand::rngs::StdRng) -> Self {
        let q41 = BlockFormat::Q4_1;
        Self {
            qkv: [
                matrix(rng, q41, HIDDEN, HIDDEN),
                matrix(rng, q41, KV, HIDDEN),
                matrix(rng, q41, KV, HIDDEN),
            ],
            o: matrix(rng, q41, HIDDEN, HIDDEN),
            gate_up: [matrix(rng, q41, MLP, HIDDEN), matrix(rng, q41, MLP, HIDDEN)],
            down: matrix(rng, q41, HIDDEN, MLP),
        }
    }

    fn macs(&self) -> usize {
        let all = self
            .qkv
            .iter()
            .chain([&self.o, &self.down])
            .chain(&self.gate_up);
        all.map(|m| m.rows() * m.cols()).sum()
    }

    /// Runs every projection of the layer on `rows` rows.
    fn run(&self, x_hidden: &[f32], x_mlp: &[f32], rows: usize) {
        let run = |mats: &[&QuantMatrix], x: &[f32]| {
            let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.0; rows * m.rows()]).collect();
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many(mats, x, &mut refs).expect("shapes match");
            std::hint::black_box(outs);
        };
        run(&self.qkv.each_ref(), x_hidden);
        run(&[&self.o], x_hidden);
        run(&self.gate_up.each_ref(), x_hidden);
        run(&[&self.down], x_mlp);
    }
}

fn main() {
    let mut rounds = 20;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--rounds" {
            rounds = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--rounds N");
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let layers: Vec<Layer> = (0..LAYERS).map(|_| Layer::new(&mut rng)).collect();
    let lm_head = matrix(&mut rng, BlockFormat::Q8_0, VOCAB, HIDDEN);
    let layer_macs = layers[0].macs() as f64;
    println!("threads {}", kernels::pool::threads());
    for rows in [1, 16] {
        let x_hidden: Vec<f32> = (0..rows * HIDDEN)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x_mlp: Vec<f32> = (0..rows * MLP)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut logits = vec![0.0; rows * VOCAB];
        let (mut streamed, mut hot, mut head) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            let t = Instant::now();
            for layer in &layers {
                layer.run(&x_hidden, &x_mlp, rows);
            }
            streamed.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..LAYERS {
                layers[0].run(&x_hidden, &x_mlp, rows);
            }
            hot.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            lm_head
                .matmul(&x_hidden, &mut logits)
                .expect("shapes match");
            head.push(t.elapsed().as_secs_f64());
        }
        let gmacs = |macs: f64, secs: f64| macs * rows as f64 / secs / 1e9;
        let (streamed, hot, head) = (median(&mut streamed), median(&mut hot), median(&mut head));
        let all = layer_macs * LAYERS as f64;
        println!(
            "rows {rows:2}: Q4_1 30 layers {:6.2} ms ({:5.1} GMAC/s) | one layer x30, cached {:6.2} ms ({:5.1} GMAC/s) | Q8_0 LM head {:6.2} ms ({:5.1} GMAC/s)",
            streamed * 1e3,
            gmacs(all, streamed),
            hot * 1e3,
            gmacs(all, hot),
            head * 1e3,
            gmacs((VOCAB * HIDDEN) as f64, head),
        );
    }
}

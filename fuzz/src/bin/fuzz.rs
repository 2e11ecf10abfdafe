//! `fuzz [--target NAME] [--seconds N] [--seed N]`: runs each target (or one) for N seconds
//! (60 by default), prints inputs per target, and on a finding writes the input to
//! `fuzz-findings/<target>-<seed>.bin` and exits 1.

use std::process::ExitCode;
use std::time::Duration;

use fuzz::{run, Budget, TARGETS};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut only, mut seconds, mut seed) = (None, 60u64, 1u64);
    while let Some(flag) = args.next() {
        let value = args.next();
        match (flag.as_str(), value) {
            ("--target", Some(v)) => only = Some(v),
            ("--seconds", Some(v)) if v.parse::<u64>().is_ok() => seconds = v.parse().unwrap_or(60),
            ("--seed", Some(v)) if v.parse::<u64>().is_ok() => seed = v.parse().unwrap_or(1),
            _ => {
                eprintln!("usage: fuzz [--target NAME] [--seconds N] [--seed N]");
                return ExitCode::from(2);
            }
        }
    }
    let targets: Vec<_> = TARGETS
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
        .collect();
    if targets.is_empty() {
        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!("no target {only:?}; targets: {}", names.join(", "));
        return ExitCode::from(2);
    }
    // Checks panic on purpose; the finding is reported below, once.
    std::panic::set_hook(Box::new(|_| {}));
    let budget = Budget {
        inputs: u64::MAX,
        time: Duration::from_secs(seconds),
    };
    for t in targets {
        match run(t, budget, seed) {
            Ok(r) => println!(
                "{}: {} inputs in {:.0?} ({:.0}/s), {} accepted, no finding",
                t.name,
                r.inputs,
                r.elapsed,
                r.inputs as f64 / r.elapsed.as_secs_f64().max(1e-9),
                r.accepted
            ),
            Err(f) => {
                let dir = std::path::Path::new("fuzz-findings");
                let path = dir.join(format!("{}-{seed}.bin", t.name));
                let saved =
                    std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &f.input));
                eprintln!(
                    "{}: FINDING: {}\ninput ({} bytes, {}): {:?}",
                    t.name,
                    f.message,
                    f.input.len(),
                    match saved {
                        Ok(()) => format!("saved to {}", path.display()),
                        Err(e) => format!("not saved: {e}"),
                    },
                    String::from_utf8_lossy(&f.input)
                );
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

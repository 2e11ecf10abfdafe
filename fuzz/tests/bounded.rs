//! The bounded fuzz run of the test command: every target, a fixed number of mutated inputs
//! from a fixed seed (so a failure replays exactly), none of which may break a check.

use std::time::Duration;

use fuzz::{run, Budget, TARGETS};

#[test]
fn every_decoder_survives_its_bounded_fuzz_run() {
    let mut failures = Vec::new();
    for t in TARGETS {
        let budget = Budget {
            inputs: 200_000,
            time: Duration::from_secs(30),
        };
        match run(t, budget, 0x5eed) {
            Ok(r) => {
                println!(
                    "{}: {} inputs, {} accepted in {:?}",
                    t.name, r.inputs, r.accepted, r.elapsed
                );
                assert!(
                    r.accepted > 0,
                    "{}: nothing accepted: the mutations miss the format",
                    t.name
                );
            }
            Err(f) => failures.push(format!(
                "{}: {}\n  input: {:?}",
                t.name,
                f.message,
                String::from_utf8_lossy(&f.input)
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

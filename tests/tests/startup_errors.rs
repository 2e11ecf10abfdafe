//! Issue 21: a start-up error is the error and its causes on one line, in plain text: no ANSI
//! colour codes when the output is not a terminal, and no backtrace even with RUST_BACKTRACE
//! set in the environment (it is meant for panics).

use std::process::Command;

use e2e::agent_bin;
use e2e::cluster::router_bin;

fn check(what: &str, cmd: &mut Command) {
    let out = cmd
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} started without its model:\n{text}"
    );
    assert!(
        text.contains("no-such-model.gguf"),
        "{what} does not name the file:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "{what} writes colour codes to a pipe:\n{text}"
    );
    assert!(
        !text.to_lowercase().contains("backtrace"),
        "{what} prints a backtrace:\n{text}"
    );
}

#[test]
fn startup_errors_are_plain_lines_without_backtraces() {
    check(
        "agent",
        Command::new(agent_bin()).args(["serve", "/nonexistent/no-such-model.gguf"]),
    );
    check(
        "router",
        Command::new(router_bin()).args([
            "--model",
            "/nonexistent/no-such-model.gguf",
            "--pod",
            "http://127.0.0.1:9",
        ]),
    );
}

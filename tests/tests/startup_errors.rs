//! Issue 21: a start-up error is the error and its causes on one line, in plain text: no ANSI
//! colour codes when the output is not a terminal, and no backtrace even with RUST_BACKTRACE
//! set in the environment (it is meant for panics).

use std::process::Command;

use e2e::cluster::router_bin;
use e2e::{agent_bin, failed_start};

fn check(what: &str, cmd: &mut Command) {
    let text = failed_start(cmd.env("RUST_BACKTRACE", "1"), &["no-such-model.gguf"]);
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

/// Issue 21: when the YAML's `kvEventsConfig.zmqEndpoint` puts the router in centralized mode
/// and its port is taken, the error says which setting wanted the port and why.
#[test]
fn a_taken_central_events_port_names_the_setting() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("e2e-central-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("epp.yaml");
    std::fs::write(
        &config,
        format!(
            "kind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-scorer\n  \
             parameters:\n    kvEventsConfig: {{zmqEndpoint: \"tcp://127.0.0.1:{port}\"}}\n\
             - type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  \
             - pluginRef: precise-prefix-cache-scorer\n  - pluginRef: max-score-picker\n"
        ),
    )
    .unwrap();
    failed_start(
        Command::new(router_bin())
            .arg("--model")
            .arg(e2e::model_path())
            .args(["--pod", "http://127.0.0.1:9", "--port", "0"])
            .arg("--config")
            .arg(&config),
        &[
            "centralized KV events mode",
            "kvEventsConfig.zmqEndpoint",
            &config.to_string_lossy(),
            &format!("tcp://127.0.0.1:{port}"),
            "another process holds the port",
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

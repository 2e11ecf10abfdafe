//! Test harness: starts real agent processes and talks HTTP to them.

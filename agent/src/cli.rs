//! Command line, spelled as `vllm serve`.

//! Model files (GGUF, Hugging Face directories), tokenizer, chat template and the forward pass.

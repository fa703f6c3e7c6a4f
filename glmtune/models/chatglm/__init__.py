"""Native ChatGLM-6B (v1) support: configuration, model and tokenizer, without remote code."""

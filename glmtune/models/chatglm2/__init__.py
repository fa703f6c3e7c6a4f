"""Native ChatGLM2-6B and ChatGLM3-6B support: configuration, model and tokenizer, without remote code."""

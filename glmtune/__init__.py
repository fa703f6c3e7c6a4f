"""glmtune: fine-tuning for the ChatGLM family and any Hugging Face causal LM."""

__version__ = "0.1.0"

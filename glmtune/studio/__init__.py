"""`glmtune studio`: fine-tuning from the browser."""

"""`glmtune export`: a trained adapter as a merged checkpoint, a clean adapter folder or one prefix file."""

"""The GPU check (`python tools/gpu_check.py`): correctness on CUDA, full-size training memory and speed,
serving, and the memory estimate against the measured peaks, in one command that writes its results to files.
See docs/gpu.md."""

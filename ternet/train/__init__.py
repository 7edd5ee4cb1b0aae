"""Training-side tools (PyTorch): fake quantization, PTQ, PROM QAT, export. Never imported by the runtime."""

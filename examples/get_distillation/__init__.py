"""One-step distillation of a diffusion teacher into a Generative Equilibrium Transformer (GET).

Run ``python -m examples.get_distillation --help`` from the repository root. The pipeline:
``data`` (image sources), ``teacher`` (EDM-preconditioned denoiser, its training command and
adapters for external teachers), ``sampling`` (Karras schedule, Heun and Euler samplers),
``pairs`` (seeded, sharded, resumable noise/image pair generation and a streaming reader) and
``metrics`` (small-scale Frechet distance, class accuracy, teacher match, optional FID).
"""

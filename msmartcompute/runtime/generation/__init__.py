"""The generation engine for decoders: a block manager over a paged KV cache (blocks.py), an
iteration-level scheduler (scheduler.py) and the worker that runs one step at a time for the
decoders of a vGPU (worker.py)."""

"""The ML core: model loading and quantization, prompts, batching and packing, the loss, memory
profiles, the fused LoRA-on-4-bit operator, training, scoring and generation, the streaming merge.

It imports torch, transformers, peft and bitsandbytes, plus loraflow's shared vocabulary (config,
records, errors, hashing, tracking protocol), and never Prefect, MLflow, Great Expectations or
datasets: it runs as it is on the bare GPU image. tests/test_layers.py keeps that true.
"""

"""The model, one file per part: config (typed shapes and presets), vision (the ViT), bridger
(MLP projector or Q-Former), language (the Llama LLM), tokenizer, vlm (CXRVLM and the vision
tower alone), checkpoint (save/load folders) and llava (export for transformers / vLLM)."""

"""`cxrlite import`: published chest X-ray models, read as published, into cxrlite bundles.

One module per family (llava_rad, maira2, cxr_llava), each a subcommand of `cxrlite import`;
what they share (files, safe pickles, provenance, licence, the checkpoint and bundle) is in
`common`, the ViT key maps (timm, transformers 4, open_clip) in `vit_keys`, the LoRA merge in
`lora`. Nothing here downloads anything: the user brings the files.
"""

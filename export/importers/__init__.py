"""`cxrlite import`: published chest X-ray models, read as published, into cxrlite bundles.

One module per family (llava_rad, ...), each a table entry of `IMPORTERS`; what they share
(files, safe pickles, provenance, licence, the checkpoint and bundle) is in `common`, the
timm ViT key map in `timm_vit`, the LoRA merge in `lora`. Nothing here downloads anything: the
user brings the files.
"""

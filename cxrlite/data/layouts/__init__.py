"""The published chest X-ray dataset layouts, one module each (MIMIC-CXR-JPG, CheXpert, IU X-ray /
Open-I, PadChest, generic and phantom JSONL), and what they share (common: splits, CSV, labels).
`cxrlite.data.datasets` picks one by name or by what a folder holds."""

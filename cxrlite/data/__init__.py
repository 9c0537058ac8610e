"""Datasets: the two record formats (records), the CheXpert vocabulary and study labels (labels),
the published dataset layouts (datasets), instruction tasks (tasks) and every prompt (prompts)."""

"""Reading radiographs, phantom radiographs, reports, labels and instruction tasks."""

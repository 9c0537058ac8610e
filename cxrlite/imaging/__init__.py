"""Reading a study: decode DICOM/PNG/JPEG into gray pixels (decode), turn them into model input
(preprocess), typed errors for unreadable images (errors), and writing DICOM files (write: PNG and DICOM files).
Everything `cxrlite serve` needs to read a radiograph, and nothing else."""

"""PACS in, draft report out: DICOM networking around the runtime (needs the `pacs` extra).

- scp.py           the DICOM Storage and Verification SCP (pynetdicom): AE titles, allow-list,
                   the image SOP classes and compressed transfer syntaxes it accepts
- spool.py         each received instance on disk, atomically, before C-STORE answers success
- outbox.py        SRs (and PDFs) waiting for delivery: JSON sidecars, retries with backoff
- destinations.py  `dimse://AET@HOST:PORT` (C-STORE) and `dicomweb+http(s)://...` (STOW-RS)
- service.py       the spool -> report -> outbox -> destination pipeline and its threads
- metrics.py       the DICOM Prometheus metrics, on the server's registry
- serving.py       the service inside `cxrlite serve`: its reports as jobs on the LLM queue
- chest.py         is this instance a chest radiograph? (pydicom only: `cxrlite report` and
                   /v1/reports refuse others without the extra); its refusal reasons
- sr.py            the draft report as a Comprehensive SR in the source study (highdicom)
- pdf.py           the draft report as a one-page PDF, and as an Encapsulated PDF instance

pynetdicom is imported only inside functions, so `cxrlite serve` without `--dicom-port`
never needs it.
"""

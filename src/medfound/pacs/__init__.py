"""medfound.pacs: a center's inference node between its PACS and the torch-free core.

- `connection`: a PACS address (``dicomweb:http://HOST:PORT/PATH`` or ``dimse:AET@HOST:PORT``)
  and what medfound asks of it: find studies (QIDO-RS / C-FIND), fetch their instances
  (WADO-RS / C-GET), store results (STOW-RS / C-STORE), echo;
- `pull`: `medfound center pull`, a PACS's studies into a folder, written atomically, never
  over a different file;
- `queue`: the node's work folder: received instances (fsync'd before they are acknowledged),
  each study's state, results waiting to be stored, decisions and usage records;
- `select`: which series of a study the model card accepts, and why the others are skipped;
- `serve`: `medfound serve`, the C-STORE SCP (and optional STOW-RS endpoint) that receives
  studies, runs `medfound.infer` on each complete one and stores its DICOM SR (or SEG) back.

Like medfound.infer, nothing here imports torch or MONAI: numpy, pydicom, pynetdicom,
dicomweb-client, highdicom and onnxruntime (or OpenVINO) are all an inference node needs.
"""

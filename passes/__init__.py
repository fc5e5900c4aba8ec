"""Graph passes of lars-fx, installed as ``lars_fx.passes``.

FX passes (``fx_*.py``, one per file) rewrite a captured optimizer step; ``pipelines`` lists each pipeline as
one list of them and ``fx_pipeline`` runs one. ONNX passes (``onnx_*.py``) build the ONNX Runtime training
artifacts.
"""

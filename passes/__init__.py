"""Graph passes of lars-fx, installed as ``lars_fx.passes``.

FX passes (``fx_*.py``) rewrite a captured ``torch.optim.SGD`` step into LARS; ``FX_PIPELINE`` in
``fx_pipeline`` is their order.
"""

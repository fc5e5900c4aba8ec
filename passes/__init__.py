"""Graph passes of lars-fx, installed as ``lars_fx.passes``."""

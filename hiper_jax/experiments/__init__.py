"""Top-layer programs built on the trainer: the estimator study (:mod:`.study`, its config
section in :mod:`.study_config`) and the builder of the tiny embedded warm start (:mod:`.tiny`).

Importing this package reads no JAX (the config files import :mod:`.study_config`).
"""
